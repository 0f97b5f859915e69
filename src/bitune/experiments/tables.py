"""Tables of a grid's report: final scores like the paper's tables (mean ± std over seeds), the budget
curve (score after each number of updates), and CSVs with one row per run, task (and curve point)."""

from __future__ import annotations

import csv
import statistics

from ..evaluation.tables import results_table
from .config import CompareConfig, run_key
from .record import GridReport

__all__ = [
    "curve_points",
    "curve_tables",
    "recorded",
    "results_of",
    "results_table",
    "runs_table",
    "write_csvs",
]


def recorded(config: CompareConfig, report: GridReport) -> list[tuple[str, str, int, dict]]:
    """``(task, method, seed, record)`` of every run of the grid recorded with its current fingerprint, and
    of every recorded run of another seed that fits the same recipe, so that a call narrowed to some seeds
    (``seeds=[44]``) keeps the others in the report's tables (an untrained method, scored once, only if the
    grid's own seed of it is not recorded); in the grid's order, seeds ascending."""
    runs = []
    for task, method, seed in config.runs():
        run = report.reusable(run_key(task, method, seed), config.fingerprint(method, seed, task))
        if run:
            runs.append((task, method, seed, run))
    found = {(task, method) for task, method, _, _ in runs}
    seeds = {key.rpartition("/seed")[2] for key in report.runs}
    for seed in sorted({int(s) for s in seeds if s.isdigit()} - set(config.seeds)):
        for task in config.grid_tasks:
            for method in config.methods:
                if (task, method) in found and not config.is_trained(method):
                    continue
                run = report.reusable(run_key(task, method, seed), config.fingerprint(method, seed, task))
                if run:
                    found.add((task, method))
                    runs.append((task, method, seed, run))
    tasks, methods = list(config.grid_tasks), list(config.methods)
    return sorted(runs, key=lambda r: (tasks.index(r[0]), r[2], methods.index(r[1])))


def results_of(config: CompareConfig, report: GridReport) -> dict[str, dict[int, dict]]:
    """Final scores of the grid's recorded runs: method -> seed -> task -> scores."""
    results: dict[str, dict[int, dict]] = {}
    for _, method, seed, run in recorded(config, report):
        if run.get("scores"):
            results.setdefault(method, {}).setdefault(seed, {}).update(run["scores"])
    return {m: dict(sorted(results[m].items())) for m in config.methods if m in results}  # grid's order


def curve_points(config: CompareConfig, report: GridReport, task: str, eval_task: str) -> dict[str, dict]:
    """method -> step -> [score of each seed] on ``eval_task`` for the grid task ``task``. The pretrained
    model (not trained) has its one score at every step of the curve."""
    runs = [(method, run) for run_task, method, _, run in recorded(config, report) if run_task == task]
    final_steps = {run.get("steps") for method, run in runs if config.is_trained(method)}
    steps = sorted(set(config.evaluation.curve_steps) | (final_steps - {None}))
    points: dict[str, dict[int, list[float]]] = {}
    for method, run in runs:
        if not config.is_trained(method):
            if eval_task in run.get("scores", {}):
                for step in steps:
                    points.setdefault(method, {}).setdefault(step, []).append(run["scores"][eval_task]["acc"])
            continue
        curve = dict(run.get("curve", {}))
        if eval_task in run.get("scores", {}) and run.get("steps") is not None:
            curve.setdefault(str(run["steps"]), {eval_task: run["scores"][eval_task]})
        for step, scores in curve.items():
            if eval_task in scores:
                points.setdefault(method, {}).setdefault(int(step), []).append(scores[eval_task]["acc"])
    return {m: dict(sorted(by_step.items())) for m, by_step in points.items()}


def curve_tables(config: CompareConfig, report: GridReport) -> str:
    """Markdown: per task, the score (%) after each number of updates, mean ± std over seeds."""
    if not config.evaluation.curve_steps:
        return ""
    blocks = []
    for task in config.grid_tasks:
        for eval_task in config.eval_tasks(task):
            points = curve_points(config, report, task, eval_task)
            steps = sorted({s for by_step in points.values() for s in by_step})
            if not steps:
                continue
            lines = [
                f"{eval_task}: accuracy % after N updates (mean ± std over seeds; seeds per point in brackets)",
                "",
                "| method | " + " | ".join(str(s) for s in steps) + " |",
                "|---|" + "---|" * len(steps),
            ]
            for method, by_step in points.items():
                lines.append(f"| {method} | " + " | ".join(_cell(by_step.get(s, [])) for s in steps) + " |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def runs_table(config: CompareConfig, report: GridReport) -> str:
    """Markdown: how each recorded run of the grid was made: updates, wall time of training and scoring,
    the source commit(s) and the command(s) (several when a run was continued)."""
    lines = [
        "| run | updates | train [min] | eval [min] | commit | command |",
        "|---|---|---|---|---|---|",
    ]
    for task, method, seed, run in recorded(config, report):
        seconds = run.get("seconds", {})
        minutes = [f"{seconds[k] / 60:.1f}" if k in seconds else "-" for k in ("train", "eval")]
        commits = ", ".join((c or "unknown")[:7] for c in run.get("commits", [])) or "-"
        commands = "; ".join(f"`{c}`" for c in run.get("commands", [])) or "-"
        lines.append(
            f"| {run_key(task, method, seed)} | {run.get('steps', '-')} | {' | '.join(minutes)} | {commits} | {commands} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{mean:.1f}{spread} ({len(values)})"


def write_csvs(config: CompareConfig, report: GridReport) -> None:
    """``results.csv``: one row per run and task (final model); with a curve, ``curve.csv``: one row per
    run, task and curve point."""
    final = [["method", "seed", "task", "metric", "score", "stderr", "n"]]
    curve = [["method", "seed", "task", "step", "score", "stderr", "n"]]
    for _, method, seed, run in recorded(config, report):
        for name, s in run.get("scores", {}).items():
            final.append(
                [method, seed, name, s.get("metric", "acc"), s["acc"], s.get("acc_stderr"), s.get("n")]
            )
        for step, scores in sorted(run.get("curve", {}).items(), key=lambda item: int(item[0])):
            curve += [
                [method, seed, name, step, s["acc"], s.get("acc_stderr"), s.get("n")]
                for name, s in scores.items()
            ]
    tables = {"results.csv": final, "curve.csv": curve if config.evaluation.curve_steps else None}
    for name, rows in tables.items():
        if rows is not None:
            with open(config.report_path / name, "w", newline="") as handle:
                csv.writer(handle).writerows(rows)
