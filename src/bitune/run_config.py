"""The configuration of a training run: model, method, data and optimisation, from YAML + overrides.

    bitune train configs/quickstart.yaml training.learning_rate=3e-4 bitune.variant=lora

A YAML file may start with ``inherit: other.yaml`` (a path relative to it) to start from another config.
Every field is type-checked (OmegaConf) and validated in ``__post_init__`` before any model is loaded;
unknown keys are errors. Defaults follow the paper (appendix 6.2, Tables 7 and 10).
"""

# OmegaConf reads these annotations at run time: keep typing's Optional/Dict/List spellings.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import BituneConfig
from .data import FORMATS, TASKS, check_source
from .optim import OPTIMIZERS

DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def _fail(section: str, name: str, message: str) -> None:
    raise ValueError(f"{section}.{name} {message}")


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
        default="arc_easy", metadata={"help": "Task name (see bitune.data.TASKS) or a data file."}
    )
    source: str = field(default="packaged", metadata={"help": "For tasks: packaged (offline) or hub."})
    format: str = field(default="auto", metadata={"help": f"For files: auto or one of {FORMATS}."})
    max_length: int = field(default=512, metadata={"help": "Rows longer than this (tokens) are dropped."})
    limit: Optional[int] = field(default=None, metadata={"help": "Use only the first N training examples."})

    def __post_init__(self) -> None:
        if self.train not in TASKS and not Path(self.train).expanduser().is_file():
            _fail(
                "data",
                "train",
                f"is neither a task ({', '.join(sorted(TASKS))}) nor an existing file: {self.train!r}",
            )
        check_source(self.source, "data.source")
        if self.format != "auto" and self.format not in FORMATS:
            _fail("data", "format", f"must be 'auto' or one of {FORMATS}, got {self.format!r}")
        if self.max_length < 2:
            _fail("data", "max_length", f"must be >= 2, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            _fail("data", "limit", f"must be >= 1 or null, got {self.limit}")


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

    def __post_init__(self) -> None:
        positive = (
            "learning_rate",
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
        if self.max_steps == -1 and self.num_epochs <= 0:
            _fail("training", "num_epochs", f"must be > 0 when max_steps is -1, got {self.num_epochs}")
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
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            _fail("training", "weight_decay/max_grad_norm", "must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            _fail("training", "save_total_limit", f"must be >= 1 or null, got {self.save_total_limit}")


@dataclass
class RunConfig:
    """A whole training run. See each section's fields for help."""

    model: ModelSection = field(default_factory=ModelSection)
    bitune: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)

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
    node = OmegaConf.load(path)
    parent = node.pop("inherit", None) if hasattr(node, "pop") else None
    if parent is None:
        return node
    return OmegaConf.merge(_load_yaml(path.parent / str(parent), (*seen, path)), node)


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
            node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ValueError(f"invalid config{f' {path}' if path else ''}: {exc}") from None
    return node


def to_object(node, what: str):
    """The validated dataclass of a config node; OmegaConf's errors become one ValueError naming ``what``."""
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        raise ValueError(f"invalid {what}: {exc}") from None


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config; raises ValueError naming the bad field before anything is loaded."""
    return to_object(config_node(path, overrides), f"config {path}" if path else "config")


def save_run_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's record of what ran)."""
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
