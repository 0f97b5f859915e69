"""The grid's plots, per task, from the training logs kept in the report (``logs/``) and its scores:

- ``loss.png``: training loss over updates, mean over seeds per method;
- ``ratio_steps.png``: the bidirectional-to-causal ratio over updates, mean over layers and seeds
  (paper Figure 2);
- ``ratio_layers_<method>.png``: the final ratio of every layer for K and V, lowest seed (Figure 3);
- ``curve.png`` (with ``evaluation.curve_steps``): accuracy after each number of updates beside the
  training loss and the mean mixing ratios, mean ± std over seeds: the budget curve.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .config import ALL, CompareConfig, run_key
from .plots import plot_bands, plot_lines, plot_ratio_per_layer
from .record import GridReport
from .tables import curve_points, recorded


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _series(logs: list[list[dict]], key: str, scale: float = 1.0) -> list[tuple[float, float, float]]:
    """(step, mean, std) of ``key`` over runs, at every step that all runs logged."""
    by_step: dict[int, list[float]] = {}
    for log in logs:
        for record in log:
            if record.get(key) is not None:
                by_step.setdefault(record["step"], []).append(scale * record[key])
    return [(step, *_stats(v)) for step, v in sorted(by_step.items()) if len(v) == len(logs)]


def _means(series: list[tuple[float, float, float]]) -> list[tuple[float, float]]:
    return [(step, mean) for step, mean, _ in series]


def plot_grid(config: CompareConfig, report: GridReport, folder: Path) -> list[Path]:
    """Write every plot of the module docstring that the recorded logs and scores allow; return the files."""
    written = []
    runs_recorded = recorded(config, report)  # with the seeds of other calls
    for task in config.grid_tasks:
        task_folder = folder / ("" if task == ALL else task)
        logs, first = {}, {}  # method -> the logs of its seeds, ascending; the lowest seed with a log
        for m in filter(config.is_trained, config.methods):
            seeds = set(config.seeds_of(m)) | {s for t, n, s, _ in runs_recorded if (t, n) == (task, m)}
            found = [(s, log) for s in sorted(seeds) if (log := report.read_log(run_key(task, m, s)))]
            if found:
                first[m], logs[m] = found[0][0], [log for _, log in found]
        if not logs:
            continue
        losses = {m: _series(runs, "loss") for m, runs in logs.items()}
        written.append(
            plot_lines(
                {m: _means(s) for m, s in losses.items()},
                task_folder / "loss.png",
                f"training loss {task}",
                "loss",
            )
        )
        mixing = {m: runs for m, runs in logs.items() if runs[0][-1].get("alpha_k")}
        ratios = {}
        for method, runs in mixing.items():
            ratios[f"{method} K"] = _series(runs, "alpha_k_mean", scale=100)
            ratios[f"{method} V"] = _series(runs, "alpha_v_mean", scale=100)
            last = runs[0][-1]
            title = f"final ratio per layer, {method} (seed {first[method]})"
            written.append(
                plot_ratio_per_layer(
                    last["alpha_k"], last["alpha_v"], task_folder / f"ratio_layers_{method}.png", title
                )
            )
        if ratios:
            title = f"bidirectional-to-causal ratio, mean over layers {task}"
            written.append(
                plot_lines(
                    {k: _means(v) for k, v in ratios.items()},
                    task_folder / "ratio_steps.png",
                    title,
                    "ratio [%]",
                )
            )
        for eval_task in config.eval_tasks(task) if config.evaluation.curve_steps else ():
            points = curve_points(config, report, task, eval_task)
            accuracy = {
                m: [(step, *_stats([100 * a for a in scores])) for step, scores in by_step.items()]
                for m, by_step in points.items()
            }
            if not any(len(series) > 1 for series in accuracy.values()):
                continue
            panels = [
                (f"held-out {eval_task}", "accuracy [%] (mean ± std over seeds)", accuracy),
                ("training loss", "loss", losses),
                ("mean mixing ratio", "bidirectional share [%]", ratios),
            ]
            name = (
                "curve.png" if task != ALL or len(config.eval_tasks(task)) == 1 else f"curve_{eval_task}.png"
            )
            written.append(
                plot_bands(panels, task_folder / name, f"budget curve, {task if task != ALL else eval_task}")
            )
    return written
