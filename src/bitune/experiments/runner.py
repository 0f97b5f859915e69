"""Running a grid: train and score every run that is not finished, in the report or in its directory.

A run is finished for an evaluation task when its record (in the committed report, or ``record.json`` in
its run directory) has a score for it made with the same fingerprint; a budget-curve point likewise. What
is missing is done: training (resuming from the run's last complete checkpoint), then scoring the final
model and each snapshot. A failed run is reported without stopping the others; the report is rewritten
after every run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

from ..evaluation import runner as evaluation
from ..evaluation.tables import paired_table, stderr_note
from ..layout import LOG_JSONL, RECORD, RUN_CONFIG, SCORE_CACHE, is_model_dir, snapshot_dir, trained_steps
from ..training.trainer import train
from .config import ALL, CompareConfig, run_key
from .figures import plot_grid
from .record import GridReport, current_command, source_commit
from .tables import curve_tables, results_of, results_table, runs_table, write_csvs


def run_grid(config: CompareConfig, report_only: bool = False) -> dict:
    """Train and evaluate every run of the grid that is not finished yet; write the report, tables and
    plots (after every run). With ``report_only``, train and score nothing: rewrite the report, tables and
    plots from what is recorded (in the report and in the run directories), e.g. while the grid runs
    elsewhere or after an upgrade changed the tables.

    Returns:
        ``{"results": method -> seed -> task -> scores, "failures": [...], ...}`` as written to
        ``results.json``.
    """
    started = time.perf_counter()
    report = GridReport(config.report_path)
    failures: list[dict] = []
    summary: dict[str, Any] = {}
    for task, method, seed in config.runs():
        key = run_key(task, method, seed)
        if report_only:  # keep what is recorded of the run, finished or not
            record = _known_record(config, report, task, method, seed)
            if record["scores"] or record["curve"]:
                report.record(key, record, log=config.run_dir(method, seed, task) / LOG_JSONL)
            continue
        try:
            record = run_one(config, report, task, method, seed)
            report.record(key, record, log=config.run_dir(method, seed, task) / LOG_JSONL)
        except Exception:  # one failed run must not stop the grid
            failures.append({"method": method, "seed": seed, "task": task, "error": traceback.format_exc()})
            print(f"!! {method} seed {seed} {task} failed:\n{failures[-1]['error']}")
        summary = write_report(config, report, failures, time.perf_counter() - started)
    if report_only:  # written once, after every record is in
        summary = write_report(config, report, failures, time.perf_counter() - started)
    print(summary["tables"])
    return summary


def run_one(config: CompareConfig, report: GridReport, task: str, method: str, seed: int) -> dict:
    """Finish one run (train if needed, score what is not scored) and return its record."""
    run_dir = config.run_dir(method, seed, task)
    record = _known_record(config, report, task, method, seed)
    tasks = config.eval_tasks(task)
    curve_steps = config.evaluation.curve_steps if config.is_trained(method) else []
    at_hand = not config.is_trained(method) or is_model_dir(run_dir)
    if not _unscored(record, tasks, at_hand) and _curve_finished(record, tasks, curve_steps):
        return record
    for name, value in (("commits", source_commit()), ("commands", current_command())):
        if value not in record.setdefault(name, []):
            record[name].append(value)
    seconds = record.setdefault("seconds", {})
    run_config = config.run_config(method, seed, task)
    target = run_config.model.name
    if config.is_trained(method):
        if not is_model_dir(run_dir):
            print(
                f"== training {method} seed {seed}"
                + (f" on {task}" if task != ALL else "")
                + f" -> {run_dir}"
            )
            began = time.perf_counter()
            train(run_config, resume=(run_dir / RUN_CONFIG).exists())
            seconds["train"] = seconds.get("train", 0.0) + time.perf_counter() - began
        record["steps"] = trained_steps(run_dir)
        _save_record(run_dir, record)  # a scoring stopped later keeps the training's wall time
        target = str(run_dir)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)

    def score(model: str, todo: list[str], into: dict) -> None:
        if not todo:
            return
        began = time.perf_counter()
        e = config.evaluation
        repeat = None if config.is_trained(method) else run_config.data.prompt_repeat
        # what is scored goes to a cache at once, so a scoring stopped half way continues where it was
        key = json.dumps([model, record.get("steps"), repeat, e.source, e.choices, e.limit, sorted(todo)])
        cache = run_dir / SCORE_CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
        scores = evaluation.evaluate_target(
            model,
            todo,
            e.source,
            limit=e.limit,
            batch_size=e.batch_size,
            choices=e.choices,
            metric=e.metric,
            prompt_repeat=repeat,
            cache=cache,
        )
        into.update(scores)
        seconds["eval"] = seconds.get("eval", 0.0) + time.perf_counter() - began
        _save_record(run_dir, record)
        shutil.rmtree(run_dir / SCORE_CACHE, ignore_errors=True)  # recorded: the cache has done its work

    todo = _unscored(record, tasks, at_hand=True)
    before = {t: record["scores"][t]["acc"] for t in todo if t in record["scores"]}
    score(target, todo, record["scores"])
    for t, acc in before.items():  # scored again for its per-question outcomes: the score must not move
        if abs(record["scores"][t]["acc"] - acc) > 1e-9:
            print(
                f"   {method} seed {seed} {t}: scored {record['scores'][t]['acc']:.4f} now, {acc:.4f} before"
            )
    for step in curve_steps:
        point = record["curve"].setdefault(str(step), {})
        todo = [t for t in tasks if t not in point]
        if not todo:
            continue
        if step >= record["steps"]:
            if step == record["steps"]:
                point.update({t: record["scores"][t] for t in todo})
            else:
                del record["curve"][str(step)]
                print(
                    f"   {method} seed {seed}: no curve point at {step}, the run ended at {record['steps']}"
                )
            continue
        snapshot = snapshot_dir(run_dir, step)
        if not is_model_dir(snapshot):
            raise FileNotFoundError(
                f"{run_dir} has no snapshot after {step} updates (it was trained without it); remove the run "
                "directory to train it again with the curve's snapshots"
            )
        score(str(snapshot), todo, point)
    _save_record(run_dir, record)
    print(f"== {method} seed {seed}: " + ", ".join(f"{t} {record['scores'][t]['acc']:.3f}" for t in tasks))
    return record


def _known_record(config: CompareConfig, report: GridReport, task: str, method: str, seed: int) -> dict:
    """What is known of a run: the report's record joined with what its run directory holds (same
    fingerprint only). Where they differ the report's wins, except that the history (commits, commands,
    wall times) keeps the longer of the two and a score keeps its per-question outcomes: the run directory
    may be newer than the report, e.g. when the report was committed from another folder."""
    fingerprint = config.fingerprint(method, seed, task)
    recorded = report.reusable(run_key(task, method, seed), fingerprint)
    record = {"fingerprint": fingerprint, "scores": {}, "curve": {}}
    path = config.run_dir(method, seed, task) / RECORD
    local = json.loads(path.read_text()) if path.is_file() else {}
    for source in (local, recorded):
        if source.get("fingerprint") != fingerprint:
            continue
        for name, value in source.items():
            if name == "scores":
                _merge_scores(record["scores"], value)
            elif name == "curve":
                for step, scores in value.items():
                    _merge_scores(record["curve"].setdefault(step, {}), scores)
            elif name in ("commits", "commands"):  # the history of both, in order
                record[name] = [*record.get(name, []), *(v for v in value if v not in record.get(name, []))]
            elif name == "seconds":  # wall times only grow: the larger is the later
                seconds = record.setdefault("seconds", {})
                seconds.update({k: max(v, seconds.get(k, 0.0)) for k, v in value.items()})
            elif name != "fingerprint":
                record[name] = value
    return record


def _merge_scores(into: dict, scores: dict) -> None:
    """Task -> score from ``scores`` into ``into``, except that a score without per-question outcomes does
    not replace one with them (the run directory's record, scored again, is then newer than the report)."""
    for task, score in scores.items():
        if "correct" in score or "correct" not in into.get(task, {}):
            into[task] = score


def _unscored(record: dict, tasks: list[str], at_hand: bool) -> list[str]:
    """The tasks the final model is still to be scored on: those without a score and, if the model is at
    hand, those scored before per-question outcomes were recorded (``correct``, for the paired comparison).
    A run known only from a committed report keeps its score."""
    return [
        t for t in tasks if t not in record["scores"] or (at_hand and "correct" not in record["scores"][t])
    ]


def _curve_finished(record: dict, tasks: list[str], curve_steps: list[int]) -> bool:
    steps = record.get("steps")
    return all(
        all(t in record["curve"].get(str(s), {}) for t in tasks)
        for s in curve_steps
        if steps is None or s <= steps
    )


def _save_record(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def write_report(config: CompareConfig, report: GridReport, failures: list[dict], seconds: float) -> dict:
    """Write ``results.json``, ``results.md`` (final scores and, with a curve, the scores per update),
    CSVs and plots into the report folder; return the summary written."""
    results = results_of(config, report)
    tasks = list(config.tasks) if config.tasks else list(config.evaluation.tasks)
    tables = results_table(results, tasks)
    note = stderr_note(results, tasks)
    if note:
        tables += "\n\n" + note
    fixed = {m for m in config.methods if not config.is_trained(m)}
    for baseline in config.comparisons:
        paired = paired_table(results, tasks, baseline, fixed)
        if paired:
            tables += (
                f"\n\nEach method against {baseline}, question by question ({config.evaluation.metric}; "
                "per question, the outcome averaged over seeds). The paired standard error is over the "
                "questions alone; the one with seeds adds the run-level variance (a whole run better or worse "
                "on every question) and gives the interval and the difference the design detects at 80 % "
                "power (two-sided test at 5 %)\n\n" + paired
            )
    curves = curve_tables(config, report)
    if curves:
        tables += "\n\n" + curves
    summary = {"results": results, "failures": failures, "seconds": {"this_call": seconds}}
    report.write(summary)
    runs = runs_table(config, report)
    (config.report_path / "results.md").write_text(tables + (f"\n\nRuns\n\n{runs}" if runs else "") + "\n")
    write_csvs(config, report)
    plot_grid(config, report, config.report_path / "plots")
    return {**summary, "tables": tables}
