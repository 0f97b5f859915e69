"""A grid's tables from its records."""

from __future__ import annotations

from conftest import grid_config


def test_a_stale_record_adds_nothing_to_the_curve(tmp_path):
    from bitune.experiments.record import GridReport
    from bitune.experiments.tables import curve_tables

    config = grid_config(tmp_path, methods={"pretrained": None, "bitune": {}})
    config.evaluation.curve_steps = [0, 2]
    report = GridReport(tmp_path / "report")
    score = {"arc_easy": {"acc": 0.5}}
    report.runs["pretrained/seed1"] = {"fingerprint": config.fingerprint("pretrained", 1), "scores": score}
    report.runs["bitune/seed1"] = {
        "fingerprint": config.fingerprint("bitune", 1),
        "steps": 4,
        "scores": score,
        "curve": {"0": score, "2": score},
    }
    report.runs["bitune/seed2"] = {"fingerprint": "another recipe", "steps": 7, "scores": score, "curve": {}}
    table = curve_tables(config, report)
    assert "| method | 0 | 2 | 4 |" in table.splitlines()  # no column for the stale run's 7 updates
    assert "| pretrained | 50.0 (1) | 50.0 (1) | 50.0 (1) |" in table.splitlines()
