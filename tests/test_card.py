"""Model cards in run directories, what `bitune push` uploads, and published runs used by their hub id
(from the local Hugging Face cache, offline)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from bitune import BituneModel
from bitune.card import push_files, write_model_card
from bitune.cli import main
from bitune.inference import generate_text, load_for_inference
from bitune.references import load_model, resolve_run
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import tiny_run_files


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model_dir, data_file = tiny_run_files(root)
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 64},
        "training": {
            "output_dir": str(root / "run"),
            "max_steps": 2,
            "batch_size": 2,
            "save_steps": 1,
            "report_to": ["none"],
        },
    }
    (root / "run.yaml").write_text(json.dumps(config))
    return train(load_run_config(root / "run.yaml"))


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_trained_run_has_a_model_card_with_metadata_and_its_mixing_ratios(run_dir, monkeypatch, tmp_path):
    card = (run_dir / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "bitune" and {"bitune", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local base directory is no hub id; the body names it
    for text in ("| variant | `bitune`", "learning_rate | 0.001", "## Final mixing ratios", "bitune serve"):
        assert text in card, text
    assert (
        card.count("| K | ") == 1 and len(card.split("| K | ")[1].splitlines()[0].split("|")) == 4
    )  # 3 layers
    monkeypatch.chdir(tmp_path)
    main(["eval", str(run_dir), "--tasks", "arc_easy", "--limit", "2", "--batch-size", "2"])
    assert (
        "## Evaluation (`bitune eval`)\n\n| task | metric | score (%) | n |"
        in (run_dir / "README.md").read_text()
    )


def test_packaged_bases_are_named_by_their_hub_id(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    meta = json.loads((copy / "bitune_config.json").read_text())
    meta["base_model_name_or_path"] = "smollm2-135m-instruct"
    (copy / "bitune_config.json").write_text(json.dumps(meta))
    assert (
        front_matter(write_model_card(copy).read_text())["base_model"]
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_push_selects_exactly_the_trained_files(run_dir):  # the upload itself needs the hub
    files = push_files(run_dir)
    assert sorted(files) == sorted(
        [
            "bitune_config.json",
            "mixing.safetensors",
            "prompt_format.json",
            "README.md",
            "run_config.yaml",
            "causal/adapter_config.json",
            "causal/adapter_model.safetensors",
            "bidir/adapter_config.json",
            "bidir/adapter_model.safetensors",
        ]
    )
    assert (run_dir / "checkpoint-2").is_dir() and (run_dir / "trainer_state.json").is_file()  # not uploaded


def test_a_published_run_is_used_by_its_hub_id_offline(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--someone--tiny-bitune"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in push_files(run_dir):  # what `bitune push` would have uploaded
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    base_reference = json.loads((run_dir / "bitune_config.json").read_text())["base_model_name_or_path"]
    base, _ = load_model(base_reference)
    with pytest.raises(FileNotFoundError, match="resolve_run"):  # the method reads local folders only
        BituneModel.from_pretrained(base, "someone/tiny-bitune")
    model = BituneModel.from_pretrained(base, resolve_run("someone/tiny-bitune"))
    assert (
        model.mixing_ratios()
        == BituneModel.from_pretrained(load_model(base_reference)[0], run_dir).mixing_ratios()
    )
    loaded = load_for_inference("someone/tiny-bitune")
    messages = [{"role": "user", "content": "abc"}]
    assert generate_text(loaded, messages, max_new_tokens=4) == generate_text(
        load_for_inference(str(run_dir)), messages, max_new_tokens=4
    )
    monkeypatch.chdir(tmp_path)
    main(["eval", "someone/tiny-bitune", "--tasks", "arc_easy", "--limit", "2", "--batch-size", "2"])
    assert "| someone/tiny-bitune | 1 |" in capsys.readouterr().out
    assert not (snapshot / "eval").exists()  # the report goes to runs/eval, never into the hub cache

    from starlette.testclient import TestClient

    from bitune.serving.app import create_app

    with TestClient(create_app(loaded, "someone/tiny-bitune")) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "someone/tiny-bitune", "messages": messages, "max_tokens": 4, "temperature": 0},
        ).json()
    assert answer["choices"][0]["message"]["content"] == generate_text(loaded, messages, max_new_tokens=4)
