"""The tiny Bitune run that the serving tests serve."""

from __future__ import annotations

import pytest
import torch

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
