"""The configuration of a training run: model, method, data and optimisation, from YAML + overrides.

    bitune train configs/quickstart.yaml training.learning_rate=3e-4 bitune.variant=lora

A YAML file may start with ``inherit: other.yaml`` (a path relative to it) to start from another config.
Every field is type-checked (OmegaConf) and validated in ``__post_init__`` before any model is loaded;
unknown keys are errors. Defaults follow the paper (appendix 6.2, Tables 7 and 10).

Contents: the four sections (``model``, ``bitune`` — derived from `BituneConfig`, so a method option is
declared once —, ``data``, ``training``), each with its checks beside its fields; the bookkeeping marks
(`RunConfig.bookkeeping_fields`); then loading, inheritance and override parsing.
"""

# OmegaConf reads these annotations at run time: keep typing's Optional/Dict/List spellings.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data import CHOICE_FORMATS, FORMATS, TASKS, TEMPLATES, TURNS, check_source, is_data_source
from ..method.config import SAME_RESULTS, BituneConfig
from ..references import is_hub_id
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
# Field metadata: a bookkeeping field does not change what a run learns, so a resume may change it and a
# compare grid's fingerprint of the run leaves it out. The method's speed- and memory-only options
# (BituneConfig fields marked SAME_RESULTS) are bookkeeping too. `RunConfig.bookkeeping_fields` lists them.
BOOKKEEPING = "bookkeeping"
ALWAYS = "always"
UNLESS_EARLY_STOPPING = "unless early stopping"  # early stopping picks the final weights by the eval loss
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


# How BituneConfig's fields appear in a run config: all under `bitune:` with the same names, except these.
_METHOD_NAMES = {"peft_config": "peft"}  # a PEFT config is a plain mapping in YAML
_METHOD_IN_TRAINING = ("checkpoint_prompt_passes",)  # a memory option, set beside the other training options


def _yaml_type(hint: Any) -> Any:
    """The OmegaConf spelling of a BituneConfig field's type (a PEFT config object becomes a mapping)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        inner = Dict[str, Any] if any(typing.get_origin(a) is dict or a is dict for a in kept) else kept[0]
        return Optional[_yaml_type(inner)] if len(kept) < len(args) else _yaml_type(inner)
    if typing.get_origin(hint) is list:
        return List[args[0]]
    if typing.get_origin(hint) is dict:
        return Dict[str, Any]
    return hint


def _method_field(config_field: dataclasses.Field, hint: Any) -> tuple[str, Any, dataclasses.Field]:
    """A run config field for a BituneConfig field: its type, default and help (and marks) as declared there."""
    return (
        _METHOD_NAMES.get(config_field.name, config_field.name),
        _yaml_type(hint),
        field(default=config_field.default, metadata=dict(config_field.metadata)),
    )


def _method_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(BituneConfig)
    return [
        _method_field(f, hints[f.name])
        for f in dataclasses.fields(BituneConfig)
        if f.name not in _METHOD_IN_TRAINING
    ]


def _from_method(name: str) -> Any:
    """A field of another section that is a BituneConfig field: its default and help as declared there."""
    config_field = next(f for f in dataclasses.fields(BituneConfig) if f.name == name)
    return field(default=config_field.default, metadata=dict(config_field.metadata))


def _validate_method(self) -> None:
    self.to_bitune_config()  # every field checked with BituneConfig's own errors


def _to_bitune_config(self, **training_fields: Any) -> BituneConfig:
    """The BituneConfig of this section (with the method fields that the training section holds)."""
    values = {f.name: getattr(self, _METHOD_NAMES.get(f.name, f.name)) for f in dataclasses.fields(BituneConfig)
              if f.name not in _METHOD_IN_TRAINING}  # fmt: skip
    if values.get("peft_config") is not None:
        values["peft_config"] = dict(values["peft_config"])
    return BituneConfig(**values, **training_fields)


# The `bitune:` section: BituneConfig's fields, derived from it, so a method option is declared once.
MethodSection = dataclasses.make_dataclass(
    "MethodSection",
    _method_fields(),
    namespace={
        "__doc__": "The method (BituneConfig's fields; `peft` is its peft_config as a mapping).",
        "__post_init__": _validate_method,
        "to_bitune_config": _to_bitune_config,
    },
)
MethodSection.__module__ = __name__  # where OmegaConf and pickle find it


@dataclass
class DataSection:
    train: Any = field(
        default="arc_easy",
        metadata={
            "help": "A task (bitune.data.TASKS), a .jsonl/.json/.parquet file, a datasets.save_to_disk folder, "
            "or (with source: hub) a Hugging Face hub dataset id; or a list of them, trained on together."
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
    choices: str = field(
        default="listed",
        metadata={
            "help": f"One of {CHOICE_FORMATS}: a multiple-choice task's questions with their choices listed "
            "(the paper's templates) or as a cloze (the question alone, the answer the choice's text)."
        },
    )
    prompt_repeat: int = field(
        default=1,
        metadata={
            "help": "Send the question of every prompt this many times (prompt repetition, Leviathan et al. "
            "2025); recorded in the run's prompt format, so eval, generate, chat and serve repeat it too."
        },
    )
    eval: Optional[str] = field(
        default=None,
        metadata={
            "help": "Evaluation data for eval loss during training: a task (its eval split), user data as in "
            "`train`, or a fraction in (0, 1) of the training examples held out.",
            BOOKKEEPING: UNLESS_EARLY_STOPPING,
        },
    )
    max_length: int = field(default=512, metadata={"help": "Rows longer than this (tokens) are dropped."})
    limit: Optional[int] = field(
        default=None, metadata={"help": "Use only the first N training examples (of each source in train)."}
    )
    eval_limit: Optional[int] = field(
        default=None,
        metadata={"help": "Use only the first N evaluation examples.", BOOKKEEPING: UNLESS_EARLY_STOPPING},
    )

    def __post_init__(self) -> None:
        check_source(self.source, "data.source")
        if isinstance(self.train, str):
            _check_data("data.train", self.train, self.source)
        elif (
            isinstance(self.train, (list, tuple, ListConfig))
            and self.train
            and all(isinstance(s, str) for s in self.train)
        ):
            if len(set(self.train)) != len(self.train):
                _fail("data", "train", f"lists a source twice: {list(self.train)}")
            for source in self.train:
                _check_data("data.train", source, self.source)
            self.train = list(self.train)
        else:
            _fail(
                "data",
                "train",
                f"must be a task, a data source or a non-empty list of them, got {self.train!r}",
            )
        if self.eval is not None and self.eval_fraction is None:
            _check_data("data.eval", self.eval, self.source)
        if self.format != "auto" and self.format not in FORMATS:
            _fail("data", "format", f"must be 'auto' or one of {FORMATS}, got {self.format!r}")
        if self.template != "auto" and self.template not in TEMPLATES:
            _fail("data", "template", f"must be 'auto' or one of {TEMPLATES}, got {self.template!r}")
        tasks = [s for s in self.sources if s in TASKS]
        if tasks and self.template not in ("auto", "paper"):
            _fail(
                "data", "template", f"must be auto or paper for the task {tasks[0]!r} (the paper's templates)"
            )
        if self.choices not in CHOICE_FORMATS:
            _fail("data", "choices", f"must be one of {CHOICE_FORMATS}, got {self.choices!r}")
        if self.prompt_repeat < 1:
            _fail("data", "prompt_repeat", f"must be >= 1, got {self.prompt_repeat}")
        if self.prompt_repeat > 1 and self.template == "raw":
            _fail("data", "prompt_repeat", "needs the paper or chat template: a raw prompt is used verbatim")
        if self.turns not in TURNS:
            _fail("data", "turns", f"must be one of {TURNS}, got {self.turns!r}")
        if self.max_length < 2:
            _fail("data", "max_length", f"must be >= 2, got {self.max_length}")
        for name in ("limit", "eval_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                _fail("data", name, f"must be >= 1 or null, got {getattr(self, name)}")

    @property
    def sources(self) -> list[str]:
        """What ``train`` names, as a list."""
        return [self.train] if isinstance(self.train, str) else list(self.train)

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
    if source == "hub" and is_hub_id(value):
        return  # a hub dataset id, loaded by datasets when the run starts
    _fail(
        *name.split("."),
        f"is neither a task ({', '.join(sorted(TASKS))}), a data file (.jsonl, .json, .parquet), a datasets folder, "
        f"nor (with data.source: hub) a hub dataset id: {value!r}",
    )


@dataclass
class TrainingSection:
    output_dir: str = field(
        default="runs/default",
        metadata={"help": "Run directory (checkpoints, logs, model).", BOOKKEEPING: ALWAYS},
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
            "authors trained with (eps 1e-6 on the uncorrected second moment; bitune.training.optim)."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (transformers' default)."})
    seed: int = field(
        default=42, metadata={"help": "Seed of adapters' init, data order and dropout (paper: 42-44)."}
    )
    save_steps: int = field(
        default=100,
        metadata={
            "help": "Checkpoint every N updates (with early stopping: where the best one can be).",
            BOOKKEEPING: UNLESS_EARLY_STOPPING,
        },
    )
    save_total_limit: Optional[int] = field(
        default=2, metadata={"help": "Checkpoints kept (null: all).", BOOKKEEPING: ALWAYS}
    )
    snapshot_steps: List[int] = field(
        default_factory=list,
        metadata={
            "help": "Updates after which the trained weights are kept in snapshots/step-N (0: before the "
            "first update), never rotated away; e.g. to score a budget curve.",
            BOOKKEEPING: ALWAYS,
        },
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log loss, lr and mixing ratios every N updates.", BOOKKEEPING: ALWAYS}
    )
    report_to: List[str] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": "HF integrations.", BOOKKEEPING: ALWAYS}
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes.", BOOKKEEPING: ALWAYS}
    )
    checkpoint_prompt_passes: bool = _from_method("checkpoint_prompt_passes")
    eval_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "With data.eval: eval loss every N updates (default: save_steps).",
            BOOKKEEPING: UNLESS_EARLY_STOPPING,
        },
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

    def bookkeeping_fields(self) -> set[str]:
        """Dotted names of the fields that do not change what this run learns (see `BOOKKEEPING`)."""
        early_stopping = self.training.early_stopping_patience is not None
        names = set()
        for section in dataclasses.fields(self):
            for f in dataclasses.fields(getattr(self, section.name)):
                kind = ALWAYS if f.metadata.get(SAME_RESULTS) else f.metadata.get(BOOKKEEPING)
                if kind == ALWAYS or (kind == UNLESS_EARLY_STOPPING and not early_stopping):
                    names.add(f"{section.name}.{f.name}")
        return names

    def bitune_config(self) -> BituneConfig:
        """The method's config, with the training section's memory option for the prompt passes."""
        training = {name: getattr(self.training, name) for name in _METHOD_IN_TRAINING}
        return self.bitune.to_bitune_config(**training)


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
