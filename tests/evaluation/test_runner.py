"""`bitune eval` from Python and the command line: structured model arguments, self-contained run
directories, report folders that never collide."""

from __future__ import annotations

import json
import shutil

import pytest

from bitune import BituneConfig, get_bitune_model
from bitune.cli import main
from bitune.evaluation import harness
from bitune.evaluation.runner import default_report_dir, evaluate_target
from bitune.references import load_model
from bitune.training.run_config import load_run_config
from bitune.training.trainer import train

from conftest import char_tokenizer, tiny_model, tiny_run_files


def test_a_path_with_a_comma_is_a_path_and_never_arguments(tmp_path, monkeypatch):
    base_dir = tmp_path / "base,trust_remote_code=True"
    tiny_model("llama").save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    base, _ = load_model(str(base_dir))
    run_dir = tmp_path / "run,trust_remote_code=True,bitune=x"
    get_bitune_model(base, BituneConfig()).save_pretrained(run_dir)
    seen = []
    real_init = harness.BituneLM.__init__

    def spy(self, pretrained, bitune=None, **kwargs):
        seen.append((pretrained, bitune, kwargs.get("trust_remote_code")))
        real_init(self, pretrained, bitune, **kwargs)

    monkeypatch.setattr(harness.BituneLM, "__init__", spy)
    scores = evaluate_target(str(run_dir), ["arc_easy"], limit=2, batch_size=2)
    assert scores["arc_easy"]["n"] == 2
    assert seen == [(str(run_dir), None, False)]  # one path, no injected arguments, no remote code


def test_a_run_copied_away_from_its_data_is_evaluated_from_any_directory(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    origin.mkdir()
    model_dir, data_file = tiny_run_files(origin)
    monkeypatch.chdir(origin)
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": data_file.name, "max_length": 64},  # relative to the working directory
        "training": {"output_dir": "run", "max_steps": 2, "batch_size": 2, "report_to": ["none"]},
    }
    (origin / "run.yaml").write_text(json.dumps(config))
    train(load_run_config(origin / "run.yaml"))
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(origin / "run", copy)
    data_file.unlink()  # the data is gone; the run must not need it
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    main(["eval", str(copy), "--tasks", "arc_easy", "--limit", "2", "--batch-size", "2"])
    assert json.loads((copy / "eval" / "results.json").read_text())["scores"]["arc_easy"]["n"] == 2


def test_default_report_folders_are_unique_per_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a/model", "b/model"):
        (tmp_path / name).mkdir(parents=True)
    first, second = default_report_dir("a/model"), default_report_dir("b/model")
    assert first != second and first.parent == second.parent == tmp_path.joinpath("runs", "eval").relative_to(
        tmp_path
    )
    assert first.name.startswith("model-") and default_report_dir("a/model") == first  # stable
    up = default_report_dir("a/model/..")  # resolves to a/, never to runs/eval itself
    assert up.name.startswith("a-") and up.parent == first.parent
    assert default_report_dir("smollm2-135m-instruct").name.startswith("smollm2-135m-instruct-")
    saved = tmp_path / "saved"
    get_bitune_model(tiny_model("llama"), BituneConfig()).save_pretrained(saved)
    assert default_report_dir(str(saved)) == saved / "eval"


@pytest.mark.parametrize("bad", [{"limit": 0}, {"batch_size": 0}])
def test_bad_evaluation_numbers_fail_before_any_model_loads(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        evaluate_target("/no/such/model", ["arc_easy"], **bad)
