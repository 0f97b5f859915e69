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


@pytest.mark.parametrize("path", EVIDENCE, ids=[p.stem for p in EVIDENCE])
def test_the_runs_of_a_committed_report_keep_their_fingerprints(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the configs' report folders are relative to the repository
    config = load_compare_config(path)
    report = config.report_path / "results.json"
    if not report.is_file():
        pytest.skip(f"{path.name} has no committed report yet")
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
