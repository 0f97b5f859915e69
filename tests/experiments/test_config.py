"""Compare configs: methods, baselines, and the fingerprints that let a grid continue from its committed
report (a change to the run config's schema must not orphan the runs recorded before it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitune.experiments import load_compare_config
from bitune.experiments.config import run_key

from conftest import grid_config

REPO = Path(__file__).resolve().parents[2]
EVIDENCE = sorted((REPO / "configs" / "evidence").glob("*.yaml"))


def test_a_baseline_must_be_a_method(tmp_path):
    config = grid_config(tmp_path)
    assert config.baseline == "lora"  # the first trained method
    path = tmp_path / "grid.yaml"
    raw = json.loads(path.read_text())
    raw["evaluation"]["baseline"] = "lorra"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"evaluation\.baseline 'lorra' is not a method"):
        load_compare_config(path)
    raw["evaluation"]["baseline"] = "lora"
    raw["evaluation"]["also_against"] = ["pretrained", "bitune"]
    path.write_text(json.dumps(raw))
    assert load_compare_config(path).comparisons == ["lora", "pretrained", "bitune"]
    for also, problem in ((["bittune"], "names 'bittune', which is not a method"), (["lora"], "repeats")):
        raw["evaluation"]["also_against"] = also
        path.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=rf"evaluation\.also_against {problem}"):
            load_compare_config(path)


def committed_report(path: Path) -> Path | None:
    for line in path.read_text().splitlines():
        if line.startswith("report_dir:"):
            report = REPO / line.split(":", 1)[1].strip() / "results.json"
            return report if report.is_file() else None
    return None


REPORTED = [p for p in EVIDENCE if committed_report(p)]


@pytest.mark.parametrize("path", REPORTED, ids=[p.stem for p in REPORTED])
def test_the_runs_of_a_committed_report_keep_their_fingerprints(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' report folders are relative to the repository
    config = load_compare_config(path)
    report = committed_report(path)
    recorded = json.loads(report.read_text())["runs"]
    runs = [
        (task, method, seed)
        for task, method, seed in config.runs()
        if run_key(task, method, seed) in recorded
    ]
    assert runs, f"none of {path.name}'s runs is in {report}"
    for task, method, seed in runs:
        assert recorded[run_key(task, method, seed)]["fingerprint"] == config.fingerprint(
            method, seed, task
        ), f"{run_key(task, method, seed)} would be trained again"


def test_bookkeeping_fields_leave_the_fingerprint_and_early_stopping_keeps_eval_in_it(tmp_path):
    config = grid_config(tmp_path)
    before = config.fingerprint("bitune", 1)
    for override in (
        "bitune.stack_prompt_passes=never",
        "training.checkpoint_prompt_passes=true",
        "training.logging_steps=1",
        "data.eval=0.25",
    ):
        changed = grid_config(tmp_path, methods={"bitune": dict([override.split("=")])})
        assert changed.fingerprint("bitune", 1) == before, override
    early = {"bitune": {"data.eval": 0.25, "training.early_stopping_patience": 1}}
    later = {"bitune": {"data.eval": 0.5, "training.early_stopping_patience": 1}}
    assert grid_config(tmp_path, methods=early).fingerprint("bitune", 1) != grid_config(
        tmp_path, methods=later
    ).fingerprint("bitune", 1)


def test_an_untrained_method_may_set_how_it_is_asked_and_runs_go_seed_by_seed(tmp_path):
    methods = {
        "pretrained": None,
        "pretrained_repeat": {"untrained": True, "data.prompt_repeat": 2},
        "lora": {"bitune.variant": "lora"},
    }
    config = grid_config(tmp_path, methods=methods)
    assert not config.is_trained("pretrained_repeat") and config.seeds_of("pretrained_repeat") == [1]
    assert config.run_config("pretrained_repeat", 1).data.prompt_repeat == 2
    assert config.fingerprint("pretrained_repeat", 1) != config.fingerprint("pretrained", 1)
    assert config.runs() == [
        ("all", "pretrained", 1),
        ("all", "pretrained_repeat", 1),
        ("all", "lora", 1),
        ("all", "lora", 2),
    ]


def test_new_evaluation_settings_change_the_fingerprint_only_when_set(tmp_path):
    config = grid_config(tmp_path)
    before = config.fingerprint("bitune", 1)
    assert config.evaluation.settings() == {"source": "packaged", "limit": 6}
    config.evaluation.choices = "cloze"
    assert config.fingerprint("bitune", 1) != before
    config.evaluation.choices, config.evaluation.metric = "listed", "acc_norm"
    assert config.fingerprint("bitune", 1) != before
