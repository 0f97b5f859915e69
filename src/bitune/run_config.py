"""The configuration of a training run: model, method, data and optimisation, from YAML + overrides.

    bitune train configs/quickstart.yaml training.learning_rate=3e-4 bitune.variant=lora

A YAML file may start with ``inherit: other.yaml`` (a path relative to it) to start from another config.
Every field is type-checked (OmegaConf) and validated in ``__post_init__`` before any model is loaded;
unknown keys are errors. Defaults follow the paper (appendix 6.2, Tables 7 and 10).

The module is long because it is the whole schema with each section's checks beside its fields (a value is
rejected where it is declared, before anything loads); loading and override parsing are the last ~100 lines.
"""

# OmegaConf reads these annotations at run time: keep typing's Optional/Dict/List spellings.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import BituneConfig
from .data import FORMATS, TASKS, TEMPLATES, TURNS, check_source, is_data_source
from .optim import OPTIMIZERS

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


REPORT_TO = (
    "none",
    "all",
    "azure_ml",
    "clearml",
    "codecarbon",
    "comet_ml",
    "dagshub",
    "dvclive",
    "flyte",
    "kubeflow",
    "mlflow",
    "neptune",
    "swanlab",
    "tensorboard",
    "trackio",
    "wandb",
)  # transformers' reporting integrations
MAX_LEARNING_RATE = 1.0  # AdamW steps move each weight by about the learning rate: above 1 is a typo


def _fail(section: str, name: str, message: str) -> None:
    raise ValueError(f"{section}.{name} {message}")


def _finite(
    section: str, name: str, value: float, low: float, high: float = math.inf, low_open: bool = False
) -> None:
    """Raise unless ``value`` is a finite number in [low, high] (``(low, high]`` with ``low_open``)."""
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bounds = (
            f"{'(' if low_open else '['}{low}, {high}]"
            if math.isfinite(high)
            else f"{'>' if low_open else '>='} {low}"
        )
        _fail(
            section,
            name,
            f"must be a finite number {'in ' if math.isfinite(high) else ''}{bounds}, got {value}",
        )


@dataclass
class ModelSection:
    name: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Packaged alias (smollm2-135m-instruct, gemma-3-270m), local directory or hub id."},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": f"Weights dtype, one of {DTYPES}; auto: bfloat16 on a bf16-capable GPU, else float32."
        },
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "eager, sdpa, ... (default: HF's)."}
    )

    def __post_init__(self) -> None:
        if not self.name:
            _fail("model", "name", "must name a model")
        if self.dtype not in DTYPES:
            _fail("model", "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class MethodSection:
    variant: str = field(default="bitune", metadata={"help": "BituneConfig.variant."})
    second_pass_mask: Optional[str] = field(default=None, metadata={"help": "BituneConfig.second_pass_mask."})
    theta_init: float = field(default=0.01, metadata={"help": "BituneConfig.theta_init."})
    alpha_init: float = field(default=0.5, metadata={"help": "BituneConfig.alpha_init."})
    peft: Optional[Dict[str, Any]] = field(
        default=None,
        metadata={"help": "PEFT config as a dict with peft_type (default: paper LoRA r8, alpha 1)."},
    )
    stack_prompt_passes: str = field(
        default="auto",
        metadata={"help": "BituneConfig.stack_prompt_passes: auto, always or never (speed only)."},
    )

    def __post_init__(self) -> None:
        self.to_bitune_config()  # validates every field with BituneConfig's own errors

    def to_bitune_config(self, checkpoint_prompt_passes: bool = False) -> BituneConfig:
        return BituneConfig(
            variant=self.variant,
            second_pass_mask=self.second_pass_mask,
            theta_init=self.theta_init,
            alpha_init=self.alpha_init,
            peft_config=dict(self.peft) if self.peft is not None else None,
            stack_prompt_passes=self.stack_prompt_passes,
            checkpoint_prompt_passes=checkpoint_prompt_passes,
        )


@dataclass
class DataSection:
    train: str = field(
        default="arc_easy",
        metadata={
            "help": "A task (bitune.data.TASKS), a .jsonl/.json/.parquet file, a datasets.save_to_disk folder, "
            "or (with source: hub) a Hugging Face hub dataset id."
        },
    )
    source: str = field(
        default="packaged", metadata={"help": "packaged (offline) or hub: tasks and dataset ids."}
    )
    split: str = field(
        default="train", metadata={"help": "User data: the split of a datasets folder or hub dataset."}
    )
    subset: Optional[str] = field(
        default=None, metadata={"help": "User data: the configuration of a hub dataset."}
    )
    format: str = field(default="auto", metadata={"help": f"User data: auto (per row) or one of {FORMATS}."})
    template: str = field(
        default="auto",
        metadata={
            "help": f"auto or one of {TEMPLATES}: how prompts are written (bitune.data.chat). auto: chat for "
            "conversations when the tokenizer has a chat template, paper otherwise (tasks: always paper)."
        },
    )
    turns: str = field(
        default="last", metadata={"help": f"One of {TURNS}: which assistant turns of a conversation train."}
    )
    eval: Optional[str] = field(
        default=None,
        metadata={
            "help": "Evaluation data for eval loss during training: a task (its eval split), user data as in "
            "`train`, or a fraction in (0, 1) of the training examples held out."
        },
    )
    max_length: int = field(default=512, metadata={"help": "Rows longer than this (tokens) are dropped."})
    limit: Optional[int] = field(default=None, metadata={"help": "Use only the first N training examples."})
    eval_limit: Optional[int] = field(
        default=None, metadata={"help": "Use only the first N evaluation examples."}
    )

    def __post_init__(self) -> None:
        check_source(self.source, "data.source")
        _check_data("data.train", self.train, self.source)
        if self.eval is not None and self.eval_fraction is None:
            _check_data("data.eval", self.eval, self.source)
        if self.format != "auto" and self.format not in FORMATS:
            _fail("data", "format", f"must be 'auto' or one of {FORMATS}, got {self.format!r}")
        if self.template != "auto" and self.template not in TEMPLATES:
            _fail("data", "template", f"must be 'auto' or one of {TEMPLATES}, got {self.template!r}")
        if self.train in TASKS and self.template not in ("auto", "paper"):
            _fail(
                "data",
                "template",
                f"must be auto or paper for the task {self.train!r} (the paper's templates)",
            )
        if self.turns not in TURNS:
            _fail("data", "turns", f"must be one of {TURNS}, got {self.turns!r}")
        if self.max_length < 2:
            _fail("data", "max_length", f"must be >= 2, got {self.max_length}")
        for name in ("limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail("data", name, f"must be >= 1 or null, got {getattr(self, name)}")

    @property
    def eval_fraction(self) -> float | None:
        """``data.eval`` as a held-out fraction of the training examples, if it is one."""
        try:
            fraction = float(self.eval) if self.eval is not None else None
        except ValueError:
            return None
        if fraction is not None and not 0 < fraction < 1:
            _fail("data", "eval", f"as a held-out fraction must be in (0, 1), got {self.eval}")
        return fraction


def _check_data(name: str, value: str, source: str) -> None:
    if value in TASKS or is_data_source(value):
        return
    if (
        source == "hub"
        and "/" in value
        and not value.startswith((".", "/", "~"))
        and not Path(value).exists()
    ):
        return  # a hub dataset id, loaded by datasets when the run starts
    _fail(
        *name.split("."),
        f"is neither a task ({', '.join(sorted(TASKS))}), a data file (.jsonl, .json, .parquet), a datasets folder, "
        f"nor (with data.source: hub) a hub dataset id: {value!r}",
    )


@dataclass
class TrainingSection:
    output_dir: str = field(
        default="runs/default", metadata={"help": "Run directory (checkpoints, logs, model)."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (paper Table 9)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer updates; -1: use num_epochs (Table 8)."})
    num_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is -1."})
    batch_size: int = field(default=1, metadata={"help": "Micro-batch per device."})
    gradient_accumulation_steps: int = field(
        default=10, metadata={"help": "Paper: batch 10 = 1 x 10 (Table 7)."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warmup over this share of updates."})
    lr_scheduler: str = field(default="linear", metadata={"help": f"One of {SCHEDULERS}."})
    optimizer: str = field(
        default="adamw_torch",
        metadata={
            "help": f"One of {OPTIMIZERS}: torch's AdamW (eps 1e-8), or the legacy transformers AdamW the "
            "authors trained with (eps 1e-6 on the uncorrected second moment; bitune.optim)."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (transformers' default)."})
    seed: int = field(
        default=42, metadata={"help": "Seed of adapters' init, data order and dropout (paper: 42-44)."}
    )
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N updates."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept (null: all)."})
    snapshot_steps: List[int] = field(
        default_factory=list,
        metadata={
            "help": "Updates after which the trained weights are kept in snapshots/step-N (0: before the "
            "first update), never rotated away; e.g. to score a budget curve."
        },
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log loss, lr and mixing ratios every N updates."}
    )
    report_to: List[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "HF integrations."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    checkpoint_prompt_passes: bool = field(
        default=False,
        metadata={
            "help": "Recompute the prompt passes in backward instead of keeping their activations: less "
            "memory for one more forward of the prompt passes (Hugging Face's gradient checkpointing would "
            "drop the prompt caches and is refused)."
        },
    )
    eval_steps: Optional[int] = field(
        default=None, metadata={"help": "With data.eval: eval loss every N updates (default: save_steps)."}
    )
    early_stopping_patience: Optional[int] = field(
        default=None,
        metadata={
            "help": "With data.eval: stop after N evaluations without a lower eval loss, and end with the best "
            "checkpoint's weights (the Trainer's EarlyStoppingCallback and load_best_model_at_end)."
        },
    )
    trainer_args: Dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any other transformers.TrainingArguments field, passed through (e.g. {fp16: true, "
            "torch_compile: true}); the fields above have their own names."
        },
    )

    def __post_init__(self) -> None:
        _finite("training", "learning_rate", self.learning_rate, 0, MAX_LEARNING_RATE, low_open=True)
        _finite("training", "weight_decay", self.weight_decay, 0)
        _finite("training", "max_grad_norm", self.max_grad_norm, 0)
        _finite("training", "num_epochs", self.num_epochs, 0, low_open=True)
        positive = (
            "batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "logging_steps",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                _fail("training", name, f"must be > 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            _fail("training", "max_steps", f"must be > 0 or -1 (use num_epochs), got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            _fail("training", "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.optimizer not in OPTIMIZERS:
            _fail("training", "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if any(s < 0 for s in self.snapshot_steps) or len(set(self.snapshot_steps)) != len(
            self.snapshot_steps
        ):
            _fail("training", "snapshot_steps", f"must be distinct steps >= 0, got {self.snapshot_steps}")
        if self.max_steps > 0 and any(s > self.max_steps for s in self.snapshot_steps):
            _fail(
                "training",
                "snapshot_steps",
                f"lists steps after max_steps={self.max_steps}: {[s for s in self.snapshot_steps if s > self.max_steps]}",
            )
        if self.lr_scheduler not in SCHEDULERS:
            _fail("training", "lr_scheduler", f"must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.dataloader_num_workers < 0:
            _fail("training", "dataloader_num_workers", f"must be >= 0, got {self.dataloader_num_workers}")
        unknown = sorted(set(self.report_to) - set(REPORT_TO))
        if unknown:
            _fail("training", "report_to", f"names unknown integrations {unknown}; known: {list(REPORT_TO)}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            _fail("training", "save_total_limit", f"must be >= 1 or null, got {self.save_total_limit}")
        for name in ("eval_steps", "early_stopping_patience"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail("training", name, f"must be >= 1 or null, got {getattr(self, name)}")
        _check_trainer_args(dict(self.trainer_args))


# TrainingArguments fields that a run config sets under their own names (or that bitune decides).
MANAGED_TRAINER_ARGS = {
    "output_dir": "training.output_dir",
    "learning_rate": "training.learning_rate",
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.num_epochs",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "warmup_steps": "training.warmup_ratio",
    "warmup_ratio": "training.warmup_ratio",
    "lr_scheduler_type": "training.lr_scheduler",
    "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm",
    "optim": "training.optimizer",
    "seed": "training.seed",
    "data_seed": "training.seed",
    "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit",
    "logging_steps": "training.logging_steps",
    "report_to": "training.report_to",
    "dataloader_num_workers": "training.dataloader_num_workers",
    "eval_steps": "training.eval_steps",
    "remove_unused_columns": "bitune (the collator's columns are the model's inputs)",
    "gradient_checkpointing": "training.checkpoint_prompt_passes (HF's would drop the prompt caches)",
}


def _check_trainer_args(args: dict[str, Any]) -> None:
    import difflib

    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for name in args:
        if name in MANAGED_TRAINER_ARGS:
            _fail(
                "training",
                "trainer_args",
                f"sets {name!r}, which a run config sets as {MANAGED_TRAINER_ARGS[name]}",
            )
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            _fail("training", "trainer_args", f"has {name!r}, which is not a TrainingArguments field{hint}")


@dataclass
class RunConfig:
    """A whole training run. See each section's fields for help."""

    model: ModelSection = field(default_factory=ModelSection)
    bitune: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def __post_init__(self) -> None:
        t = self.training
        if self.data.eval is None and (t.eval_steps or t.early_stopping_patience):
            _fail("training", "eval_steps/early_stopping_patience", "need evaluation data: set data.eval")
        if t.early_stopping_patience and t.save_steps % (t.eval_steps or t.save_steps):
            _fail(
                "training",
                "save_steps",
                f"must be a multiple of eval_steps={t.eval_steps} to keep the best checkpoint",
            )
        if self.model.dtype == "float16":
            _fail(
                "model",
                "dtype",
                "float16 weights would train without loss scaling (gradients underflow); use bfloat16, or float32 "
                "with training.trainer_args {fp16: true} for mixed precision with loss scaling on a GPU",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def bitune_config(self) -> BituneConfig:
        """The method's config, with the training section's memory option for the prompt passes."""
        return self.bitune.to_bitune_config(checkpoint_prompt_passes=self.training.checkpoint_prompt_passes)


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    path = path.expanduser().resolve()
    if path in seen:
        raise ValueError(f"config inheritance loops through {path}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 text file") from None
    if not isinstance(node, DictConfig):
        raise ValueError(f"{path} must hold a mapping of sections (key: value), not a {type(node).__name__}")
    if not node and not seen:
        raise ValueError(
            f"{path} is empty; start from a config in configs/ (an empty file would run all defaults)"
        )
    parent = node.pop("inherit", None)
    if parent is None:
        return node
    if not isinstance(parent, str):
        raise ValueError(f"{path}: inherit must be a path (a string), got {parent!r}")
    return OmegaConf.merge(_load_yaml(path.parent / parent, (*seen, path)), node)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def one_line(exc: BaseException) -> str:
    """An OmegaConf error as one line: its message and the key it names."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    keep = (
        [lines[0], *(line for line in lines[1:] if line.startswith("full_key:"))]
        if lines
        else [type(exc).__name__]
    )
    return "; ".join(keep)


def config_node(path: str | Path | None, overrides: list[str] | None = None, schema: type = RunConfig):
    """The merged, type-checked (not yet validated) config: schema defaults <- YAML <- overrides."""
    try:
        node = OmegaConf.structured(schema)
        if path is not None:
            node = OmegaConf.merge(node, _load_yaml(Path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(
                    f"overrides must look like key=value (e.g. training.learning_rate=3e-4), got {bad}"
                )
            for override in overrides:  # one at a time, so an error names the override
                try:
                    parsed = OmegaConf.from_dotlist([override])
                except yaml.YAMLError as exc:
                    raise ValueError(f"invalid override {override!r}: {_yaml_problem(exc)}") from None
                node = OmegaConf.merge(node, parsed)
    except (OmegaConfBaseException, TypeError) as exc:  # TypeError: a list where a mapping belongs
        raise ValueError(f"invalid config{f' {path}' if path else ''}: {one_line(exc)}") from None
    return node


def to_object(node, what: str):
    """The validated dataclass of a config node; OmegaConf's errors become one ValueError naming ``what``."""
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ValueError(f"invalid {what}: {one_line(exc)}") from None


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config; raises ValueError naming the bad field before anything is loaded."""
    return to_object(config_node(path, overrides), f"config {path}" if path else "config")


def save_run_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's record of what ran)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
