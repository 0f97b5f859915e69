"""Training a Bitune model with the Hugging Face Trainer (and so with ``accelerate launch`` for scale-out).

What the Trainer does not know about Bitune is added here and nothing else:

- checkpoints hold only what trains (adapters, thetas; plus the Trainer's optimizer, scheduler, RNG and
  data position), never the frozen base weights (`BituneTrainer._save`, `_load_from_checkpoint`);
- a checkpoint counts as complete only once the Trainer wrote its state last, so ``resume`` continues
  from the newest complete one and discards any a kill left half-written (`latest_complete_checkpoint`);
- per-layer mixing ratios are logged with loss and learning rate to ``log.jsonl``/``log.csv`` in the run
  directory and to TensorBoard (`MixingLogCallback`);
- ``training.snapshot_steps`` keeps the trained weights after chosen updates in ``snapshots/step-N``
  (`SnapshotCallback`), e.g. to score a budget curve; ``training.optimizer`` picks the optimiser (optim.py).

The run directory ends up holding the trained model (``bitune_config.json``, adapters, ``mixing.safetensors``),
the tokenizer, the resolved ``run_config.yaml``, the logs and the checkpoints.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from .data import BituneCollator, load_rows
from .hub import load_model
from .layout import (
    LOG_CSV,
    LOG_JSONL,
    RUN_CONFIG,
    is_model_dir,
    latest_complete_checkpoint,
    snapshot_dir,
)
from .model import BituneModel, get_bitune_model
from .optim import optimizer_cls_and_kwargs
from .run_config import RunConfig, save_run_config


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bfloat16 on a bf16-capable GPU (as the paper trains) and float32 elsewhere."""
    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, name)


class BituneTrainer(Trainer):
    """The Hugging Face Trainer, saving and loading a BituneModel's trained weights only."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_trained_weights(resume_from_checkpoint)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        ratios = model.mixing_ratios()
        if ratios["k"] and "loss" in logs:
            logs["alpha_k_mean"] = sum(ratios["k"]) / len(ratios["k"])
            logs["alpha_v_mean"] = sum(ratios["v"]) / len(ratios["v"])
        super().log(logs, start_time)


class MixingLogCallback(TrainerCallback):
    """Appends every training log (loss, learning rate, per-layer alpha_k / alpha_v) to ``log.jsonl`` and
    ``log.csv`` in the run directory, and the per-layer ratios to TensorBoard when it is enabled."""

    def __init__(self, model: BituneModel, output_dir: str | Path, tensorboard: bool) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.tensorboard = tensorboard
        self.writer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        ratios = self.model.mixing_ratios()
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            **logs,
            "alpha_k": ratios["k"],
            "alpha_v": ratios["v"],
        }
        with open(self.output_dir / LOG_JSONL, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        flat = {k: v for k, v in record.items() if not isinstance(v, list)}
        for kind in ("k", "v"):
            flat.update({f"alpha_{kind}_{i:02d}": a for i, a in enumerate(ratios[kind])})
        path = self.output_dir / LOG_CSV
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(flat), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(flat)
        if self.tensorboard and ratios["k"]:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "runs" / "mixing"))  # beside the Trainer's
            for kind in ("k", "v"):
                for i, alpha in enumerate(ratios[kind]):
                    self.writer.add_scalar(f"mixing/alpha_{kind}/layer_{i:02d}", alpha, state.global_step)
            self.writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()


class SnapshotCallback(TrainerCallback):
    """Saves the model's trained weights after each of ``steps`` updates into `snapshot_dir` (0: before
    the first update). A snapshot that exists is kept, so a resumed run does not rewrite it; at
    ``on_train_begin`` the model holds its initial weights even when resuming (the Trainer loads a
    checkpoint after that event)."""

    def __init__(self, model: BituneModel, output_dir: str | Path, steps: list[int]) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.steps = set(steps)

    def _snapshot(self, state, step: int) -> None:
        folder = snapshot_dir(self.output_dir, step)
        if state.is_world_process_zero and step in self.steps and not is_model_dir(folder):
            self.model.save_pretrained(folder)

    def on_train_begin(self, args, state, control, **kwargs):
        self._snapshot(state, 0)

    def on_step_end(self, args, state, control, **kwargs):
        self._snapshot(state, state.global_step)


def training_arguments(config: RunConfig, dtype: torch.dtype) -> TrainingArguments:
    """The Trainer's arguments for a run config (AdamW, linear schedule with warmup, weight decay 0, ...)."""
    t = config.training
    report_to = [r for r in t.report_to if r != "none"] or "none"
    return TrainingArguments(
        output_dir=t.output_dir,
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        seed=t.seed,
        data_seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        report_to=report_to,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient every step
        dataloader_num_workers=t.dataloader_num_workers,
        bf16=False,  # weights are loaded in the run's dtype; adapters and thetas stay fp32
        use_cpu=not torch.cuda.is_available(),
    )


def train(config: RunConfig, resume: bool = False) -> Path:
    """Train one run and return its directory (which then holds the trained model).

    Args:
        config: a validated run config (`bitune.run_config.load_run_config`).
        resume: continue from the newest complete checkpoint in ``training.output_dir`` (fresh start if none).

    Raises:
        FileExistsError: if the run directory already holds a run and ``resume`` is False.
    """
    output_dir = Path(config.training.output_dir)
    if not resume and (output_dir / RUN_CONFIG).exists():
        raise FileExistsError(
            f"{output_dir} already holds a run; pass resume=True (--resume) or another output_dir"
        )
    checkpoint = latest_complete_checkpoint(output_dir, discard_incomplete=True) if resume else None
    output_dir.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(config.model.dtype)
    set_seed(config.training.seed)  # adapters' initialisation
    model, tokenizer = load_model(
        config.model.name, dtype=dtype, attn_implementation=config.model.attn_implementation
    )
    rows, _ = load_rows(
        config.data.train,
        tokenizer,
        split="train",
        data_source=config.data.source,
        data_format=config.data.format,
        max_length=config.data.max_length,
        limit=config.data.limit,
    )
    if not rows:
        raise ValueError(f"no training rows left from {config.data.train!r} (see the summary above)")
    bitune_model = get_bitune_model(model, config.bitune_config())
    args = training_arguments(config, dtype)
    if args.should_save:
        save_run_config(config, output_dir / RUN_CONFIG)
    callbacks = [MixingLogCallback(bitune_model, output_dir, "tensorboard" in config.training.report_to)]
    if config.training.snapshot_steps:
        callbacks.append(SnapshotCallback(bitune_model, output_dir, config.training.snapshot_steps))
    trainer = BituneTrainer(
        model=bitune_model,
        args=args,
        train_dataset=rows,
        data_collator=BituneCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
            config.training.optimizer, config.training.learning_rate
        ),
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(output_dir))
    trainer.save_state()  # trainer_state.json: the steps trained and the log history
    return output_dir
