"""The tiny Bitune run that the serving tests serve."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import uvicorn

from bitune import BituneConfig, get_bitune_model
from bitune.data import PromptFormat
from bitune.references import load_model

from conftest import char_tokenizer, randomize_adapters, tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny Bitune run (random adapters, thetas moved off their init) with a chat template."""
    root = tmp_path_factory.mktemp("serve")
    tiny_model("llama").save_pretrained(root / "base")
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(root / "base")
    base, tokenizer = load_model(str(root / "base"))
    model = get_bitune_model(base, BituneConfig())
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        model.mixing.theta_k.copy_(torch.tensor([0.02, 0.005, 0.03]))
    model.save_pretrained(root / "run")
    PromptFormat.for_tokenizer("chat", tokenizer).save(root / "run")
    return root / "run"


class Server:
    """The app under uvicorn in a thread, on a port the system picks (port 0: no two tests can collide)."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 600  # a guard against a hang, not a timing: the loop ends when it starts
        while not self.server.started and self.thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
