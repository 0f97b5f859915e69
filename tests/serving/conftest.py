"""The tiny Bitune run that the serving tests serve."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from bitune import BituneConfig, get_bitune_model
from bitune.data import PromptFormat
from bitune.references import load_model

from conftest import char_tokenizer, randomize_adapters, tiny_model

REPO = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_run(root, **model_overrides):
    """A tiny Bitune run (random adapters, thetas moved off their init) with a chat template in ``root/run``,
    and its base model in ``root/base``."""
    tiny_model("llama", **model_overrides).save_pretrained(root / "base")
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


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return chat_run(tmp_path_factory.mktemp("serve"))


def serve_process(*args: str, code: str | None = None, **env) -> tuple[subprocess.Popen, int]:
    """`bitune serve ARGS --port 0` in a child process (``code``: a script standing in for ``-m bitune``)
    and the port the system picked, read from uvicorn's own line (port 0: no two tests can collide)."""
    command = [sys.executable, *(["-c", code] if code else ["-m", "bitune"]), "serve", "--port", "0", *args]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )
    log = []
    for line in proc.stdout:
        log.append(line)
        if "Uvicorn running on http://127.0.0.1:" in line:
            return proc, int(line.split("http://127.0.0.1:")[1].split()[0])
    raise AssertionError("the server did not start: " + "".join(log))


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
