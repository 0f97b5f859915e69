"""`bitune compare`: a methods x seeds grid on a tiny model, its table, resuming, failure isolation and
continuing from a committed report."""

from __future__ import annotations

import dataclasses
import json

from bitune.experiments import run_grid

from conftest import grid_config


def test_grid_trains_evaluates_and_tabulates(tmp_path):
    config = grid_config(tmp_path)
    summary = run_grid(config)
    assert not summary["failures"]
    results = summary["results"]
    assert set(results) == {"pretrained", "lora", "bitune"}
    assert set(results["pretrained"]) == {1} and set(results["lora"]) == set(results["bitune"]) == {1, 2}
    for by_seed in results.values():
        for scores in by_seed.values():
            assert scores["arc_easy"]["n"] == 6 and 0 <= scores["arc_easy"]["acc"] <= 1
    assert not (tmp_path / "grid" / "pretrained" / "seed2").exists()  # untrained: scored once
    assert not (tmp_path / "grid" / "pretrained" / "seed1" / "bitune_config.json").exists()
    assert (tmp_path / "grid" / "bitune" / "seed2" / "bitune_config.json").exists()
    table = (tmp_path / "grid" / "results.md").read_text()
    assert table.splitlines()[0] == "| method | seeds | arc_easy | avg |"
    assert "| pretrained | 1 | " in table and "| lora | 2 | " in table and "±" in table
    saved = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert saved["results"]["lora"]["1"]["arc_easy"] == results["lora"][1]["arc_easy"]


def forget(config, method: str, seed: int) -> None:
    """Drop one run's scores from its run directory and the report, so that it must be scored again."""
    (config.run_dir(method, seed) / "record.json").unlink()
    path = config.report_path / "results.json"
    report = json.loads(path.read_text())
    del report["runs"][f"{method}/seed{seed}"]
    path.write_text(json.dumps(report))


def record_evaluations(monkeypatch) -> list[str]:
    """The targets scored from now on (each is still scored)."""
    import bitune.evaluation.runner

    real = bitune.evaluation.runner.evaluate_target
    calls = []
    monkeypatch.setattr(
        bitune.evaluation.runner,
        "evaluate_target",
        lambda target, *a, **k: calls.append(target) or real(target, *a, **k),
    )
    return calls


def test_grid_resumes_and_isolates_failures(tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods={"lora": {"bitune.variant": "lora"}, "bitune": {}})
    run_grid(config)
    trained = tmp_path / "grid" / "lora" / "seed1" / "bitune_config.json"
    stamp = trained.stat().st_mtime_ns
    forget(config, "bitune", 1)  # this one must be evaluated again

    import bitune.evaluation.runner

    real = bitune.evaluation.runner.evaluate_target
    calls = []

    def flaky(target, *args, **kwargs):
        calls.append(target)
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", flaky)
    summary = run_grid(config)
    assert trained.stat().st_mtime_ns == stamp  # finished runs are not repeated
    assert calls == [str(tmp_path / "grid" / "bitune" / "seed1")]  # only the missing evaluation ran
    assert [(f["method"], f["seed"], f["task"]) for f in summary["failures"]] == [("bitune", 1, "all")]
    assert "evaluation crashed" in summary["failures"][0]["error"]
    assert set(summary["results"]["lora"]) == {1, 2} and set(summary["results"]["bitune"]) == {2}
    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", real)
    assert not run_grid(config)["failures"]


def test_a_run_whose_scoring_fails_keeps_its_training_wall_time(tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods={"bitune": {}})
    config.seeds = [1]
    import bitune.evaluation.runner

    real = bitune.evaluation.runner.evaluate_target

    def killed(*args, **kwargs):
        raise RuntimeError("killed while scoring")

    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", killed)
    assert run_grid(config)["failures"]
    trained = json.loads((config.run_dir("bitune", 1) / "record.json").read_text())
    assert trained["seconds"]["train"] > 0 and "eval" not in trained["seconds"] and not trained["scores"]
    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", real)
    assert not run_grid(config)["failures"]
    run = json.loads((config.report_path / "results.json").read_text())["runs"]["bitune/seed1"]
    assert run["seconds"]["train"] == trained["seconds"]["train"] and run["seconds"]["eval"] > 0


def test_a_grid_continues_from_its_committed_report_on_a_fresh_machine(tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods={"pretrained": None, "bitune": {}})
    config.report_dir = str(tmp_path / "report")
    config.evaluation.curve_steps = [0, 2, 4]
    first = run_grid(config)
    assert not first["failures"]
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    run = report["runs"]["bitune/seed2"]
    assert run["steps"] == 4 and set(run["curve"]) == {"0", "2", "4"}
    assert run["curve"]["4"] == run["scores"]  # the final model is the last curve point
    assert run["commands"] and run["commits"] and run["seconds"]["train"] > 0 and run["seconds"]["eval"] > 0
    assert (tmp_path / "report" / "logs" / "bitune" / "seed2.jsonl").is_file()
    assert (tmp_path / "report" / "plots" / "curve.png").is_file()
    curve = (tmp_path / "report" / "results.md").read_text()
    assert "| method | 0 | 2 | 4 |" in curve and "| pretrained | " in curve

    import shutil

    import bitune.evaluation.runner
    import bitune.experiments.runner

    shutil.rmtree(tmp_path / "grid")  # a fresh machine: only the committed report folder is left
    calls = []
    monkeypatch.setattr(bitune.experiments.runner, "train", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", lambda *a, **k: calls.append("eval"))
    again = run_grid(config)
    assert calls == [] and not again["failures"]
    assert again["results"] == {m: {int(k): v for k, v in s.items()} for m, s in first["results"].items()}
    assert (tmp_path / "report" / "results.md").read_text() == curve

    config.run["training"]["learning_rate"] = 0.02  # another recipe: nothing recorded fits it
    calls.clear()
    run_grid(config)  # (the stub trains nothing, so those runs then fail to score)
    assert calls == ["train", "train"]  # both seeds of bitune train again; the pretrained score still fits


def test_report_only_rewrites_the_report_from_records_without_running_anything(tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods={"pretrained": None, "bitune": {}})
    config.report_dir = str(tmp_path / "report")
    config.evaluation.curve_steps = [0, 2]
    import bitune.evaluation.runner
    import bitune.experiments.runner

    calls = []
    monkeypatch.setattr(bitune.experiments.runner, "train", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", lambda *a, **k: calls.append("eval"))
    empty = run_grid(config, report_only=True)
    assert calls == [] and empty["results"] == {}

    monkeypatch.undo()
    finished = run_grid(config)
    report = tmp_path / "report" / "results.json"
    saved = json.loads(report.read_text())
    del saved["runs"]["bitune/seed2"]  # recorded only in its run directory now
    saved["runs"]["bitune/seed1"]["curve"]["2"]["arc_easy"]["acc"] = 0.0  # the report's record wins
    report.write_text(json.dumps(saved))
    (tmp_path / "report" / "results.md").unlink()
    monkeypatch.setattr(bitune.experiments.runner, "train", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(bitune.evaluation.runner, "evaluate_target", lambda *a, **k: calls.append("eval"))
    again = run_grid(config, report_only=True)
    assert calls == []
    assert again["results"] == finished["results"]
    rewritten = json.loads(report.read_text())["runs"]
    assert rewritten["bitune/seed2"]["scores"] == finished["results"]["bitune"][2]
    assert rewritten["bitune/seed1"]["curve"]["2"]["arc_easy"]["acc"] == 0.0
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| bitune | " in table and "| bitune/seed2 | 4 | " in table  # the runs: updates, times, commands
    assert "Standard error of one run's score on its questions, in points: arc_easy " in table

    config.seeds = [2]  # a call narrowed to one seed keeps the other recorded seeds in the tables
    narrowed = run_grid(config, report_only=True)
    assert calls == [] and narrowed["results"] == finished["results"]
    assert "| bitune/seed1 | 4 | " in (tmp_path / "report" / "results.md").read_text()


def test_downstream_grid_trains_per_task_and_plots(tmp_path):
    config = grid_config(tmp_path, methods={"lora": {"bitune.variant": "lora"}, "bitune": {}})
    config.tasks = ["siqa", "csqa"]
    config.seeds = [1]
    config.run["data"].update(limit=12, max_length=400)  # SIQA/CSQA rows are long in characters
    summary = run_grid(config)
    assert not summary["failures"]
    assert set(summary["results"]) == {"lora", "bitune"} and set(summary["results"]["bitune"][1]) == {
        "siqa",
        "csqa",
    }
    run = config.run_config("bitune", 1, "siqa")
    assert run.data.train == "siqa" and run.training.output_dir.endswith("siqa/bitune/seed1")
    assert (tmp_path / "grid" / "csqa" / "lora" / "seed1" / "bitune_config.json").exists()
    table = (tmp_path / "grid" / "results.md").read_text().splitlines()
    assert table[0] == "| method | seeds | siqa | csqa | avg |"
    rows = (tmp_path / "grid" / "results.csv").read_text().splitlines()
    assert rows[0] == "method,seed,task,metric,score,stderr,n" and len(rows) == 1 + 2 * 2
    plots = {
        p.relative_to(tmp_path / "grid" / "plots").as_posix()
        for p in (tmp_path / "grid" / "plots").rglob("*.png")
    }
    assert plots == {
        f"{task}/{name}"
        for task in ("siqa", "csqa")
        for name in ("loss.png", "ratio_steps.png", "ratio_layers_bitune.png")
    }


def test_runs_scored_before_outcomes_were_recorded_are_scored_again_only_when_at_hand(tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods={"lora": {"bitune.variant": "lora"}, "bitune": {}})
    first = run_grid(config)
    scores = first["results"]["bitune"][1]["arc_easy"]
    assert len(scores["correct"]) == 6 and scores["correct"].count("1") == round(6 * scores["acc"])
    table = (tmp_path / "grid" / "results.md").read_text()
    assert (
        "Each method against lora, question by question" in table
        and "| bitune | arc_easy | 2 vs 2 | " in table
        and "Each method against bitune" not in table
    )
    also = dataclasses.replace(
        config, evaluation=dataclasses.replace(config.evaluation, also_against=["bitune"])
    )
    run_grid(also, report_only=True)  # a second table, against bitune, from the same records
    table = (tmp_path / "grid" / "results.md").read_text()
    lora_first = table.index("Each method against lora")
    assert table.index("Each method against bitune") > lora_first
    assert "| lora | arc_easy | 2 vs 2 | " in table[table.index("Each method against bitune") :]

    import shutil

    path = config.report_path / "results.json"
    report = json.loads(path.read_text())
    for seed in (1, 2):  # as recorded before per-question outcomes existed
        del report["runs"][f"bitune/seed{seed}"]["scores"]["arc_easy"]["correct"]
        (config.run_dir("bitune", seed) / "record.json").unlink()
    path.write_text(json.dumps(report))
    shutil.rmtree(config.run_dir("bitune", 2))  # known only from the report: its score stays as it is
    calls = record_evaluations(monkeypatch)
    again = run_grid(config)
    assert calls == [str(config.run_dir("bitune", 1))]
    assert again["results"]["bitune"][1]["arc_easy"] == scores  # the same score, with its outcomes
    assert "correct" not in again["results"]["bitune"][2]["arc_easy"]
    assert "| bitune | arc_easy | 1 vs 2 | " in (tmp_path / "grid" / "results.md").read_text()

    report = json.loads(path.read_text())  # an older report beside the run directory scored again
    local = json.loads((config.run_dir("bitune", 1) / "record.json").read_text())
    older = report["runs"]["bitune/seed1"]
    del older["scores"]["arc_easy"]["correct"]
    older.update(commits=["0ld"], seconds={"train": local["seconds"]["train"], "eval": 0.0})
    path.write_text(json.dumps(report))
    calls.clear()
    assert run_grid(config, report_only=True)["results"]["bitune"][1]["arc_easy"] == scores
    joined = json.loads(path.read_text())["runs"]["bitune/seed1"]
    assert joined["commits"] == [*local["commits"], "0ld"] and joined["seconds"] == local["seconds"]
    assert run_grid(config)["results"]["bitune"][1]["arc_easy"] == scores and calls == []


def test_a_run_interrupted_between_curve_points_scores_only_the_missing_point(tmp_path, monkeypatch):
    config = grid_config(tmp_path, methods={"bitune": {}})
    config.seeds = [1]
    config.evaluation.curve_steps = [0, 2]
    first = run_grid(config)["results"]
    for path in (config.report_path / "results.json", config.run_dir("bitune", 1) / "record.json"):
        saved = json.loads(path.read_text())
        run = saved["runs"]["bitune/seed1"] if "runs" in saved else saved
        del run["curve"]["2"]  # stopped while scoring the snapshot after 2 updates
        path.write_text(json.dumps(saved))
    calls = record_evaluations(monkeypatch)
    again = run_grid(config)
    assert not again["failures"] and again["results"] == first
    assert calls == [str(config.run_dir("bitune", 1) / "snapshots" / "step-2")]
    assert (
        "2" in json.loads((config.report_path / "results.json").read_text())["runs"]["bitune/seed1"]["curve"]
    )


def test_a_scoring_stopped_half_way_continues_from_its_cache_and_scores_the_same(tmp_path, monkeypatch):
    import bitune.evaluation.scoring as scoring

    config = grid_config(tmp_path, methods={"bitune": {}})
    config.seeds = [1]
    real, scored = scoring._score_group, []

    def stopped_after_two_groups(model, prompts, requests):
        if len(scored) == 2:
            raise RuntimeError("killed while scoring")
        out = real(model, prompts, requests)
        scored.append(len(requests))
        return out

    monkeypatch.setattr(scoring, "_score_group", stopped_after_two_groups)
    assert run_grid(config)["failures"]
    run_dir = config.run_dir("bitune", 1)
    assert len(list((run_dir / "score-cache").iterdir())) == 1  # what the two groups scored, kept

    def counted(model, prompts, requests):
        scored.append(len(requests))
        return real(model, prompts, requests)

    monkeypatch.setattr(scoring, "_score_group", counted)
    before, scored[:] = sum(scored), []
    resumed = run_grid(config)
    assert not resumed["failures"]
    total = sum(scored) + before
    assert before > 0 and total == 6 * 4  # six questions of four choices: each scored once, over two runs
    assert not (run_dir / "score-cache").exists()  # recorded: the cache is gone
    forget(config, "bitune", 1)
    scored[:] = []
    again = run_grid(config)  # scored from scratch
    assert sum(scored) == 6 * 4
    assert again["results"] == resumed["results"]
