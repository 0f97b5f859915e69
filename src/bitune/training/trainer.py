"""Training a Bitune model with the Hugging Face Trainer (and so with ``accelerate launch`` for scale-out).

What the Trainer does not know about Bitune is added here and nothing else:

- checkpoints hold only what trains (adapters, thetas; plus the Trainer's optimizer, scheduler, RNG and
  data position), never the frozen base weights (`BituneTrainer._save`, `_load_from_checkpoint`);
- a checkpoint counts as complete only once the Trainer wrote its state last, so ``resume`` continues
  from the newest complete one and discards any a kill left half-written (`latest_complete_checkpoint`);
- per-layer mixing ratios are logged with loss and learning rate to ``log.jsonl``/``log.csv`` in the run
  directory and to TensorBoard (`MixingLogCallback`);
- ``training.snapshot_steps`` keeps the trained weights after chosen updates in ``snapshots/step-N``
  (`SnapshotCallback`), e.g. to score a budget curve; ``training.optimizer`` picks the optimiser (optim.py);
- training stops at the first non-finite gradient or weight (`FiniteCheck`), and the run directory is
  locked while a process trains into it; a resume must mean the same run (guard.py).

The run directory ends up holding the trained model (``bitune_config.json``, adapters, ``mixing.safetensors``),
its prompt format, a model card (``README.md``), the tokenizer, the resolved ``run_config.yaml``, the logs
and the checkpoints (layout.py).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from ..card import write_model_card
from ..data import TASKS, BituneCollator, PromptFormat, load_rows
from ..layout import RUN_CONFIG, checkpoints, is_model_dir, latest_complete_checkpoint, trained_steps
from ..method import compat
from ..method.model import get_bitune_model
from ..references import load_model
from . import sharding
from .callbacks import FiniteCheck, MixingLogCallback, SnapshotCallback
from .guard import RunLock, record_resume, resume_changes, trim_logs
from .optim import optimizer_cls_and_kwargs
from .run_config import RunConfig, save_run_config


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` is bfloat16 on a bf16-capable GPU (as the paper trains) and float32 elsewhere."""
    if name == "auto":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    return getattr(torch, name)


class BituneTrainerMixin:
    """What a Hugging Face Trainer (or a subclass such as TRL's ``SFTTrainer``) needs to train a
    BituneModel: checkpoints of the trained weights only (with the run's prompt format), loading them to
    resume or to end with the best one, and the mean mixing ratios in its logs."""

    prompt_format: PromptFormat | None = None
    _loaded_before_sharding: str | None = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if sharding.fsdp_requested():
            sharding.enable_fsdp(self.accelerator, self.model)
            self.is_fsdp_enabled = True

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        if resume_from_checkpoint and self.is_fsdp_enabled and not sharding.is_sharded(self.model):
            # into the whole model, before accelerate shards it (the Trainer would load after that)
            self.accelerator.unwrap_model(self.model).load_trained_weights(resume_from_checkpoint)
            self._loaded_before_sharding = str(resume_from_checkpoint)
        deepspeed = self.is_deepspeed_enabled
        if deepspeed:
            self.add_callback(sharding.MixingReadByTheWholeModel)
        with sharding.deepspeed_resumes_without_frozen_weights() if deepspeed else contextlib.nullcontext():
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # a sharded model: gather what trains (not the frozen base), on every process; under DeepSpeed
        # the Trainer would copy the whole model's state first
        trained = sharding.gathered_trained_weights(self.accelerator.unwrap_model(self.model))
        if trained is not None or self.is_deepspeed_enabled:
            self._save(output_dir, state_dict=trained)
        else:
            super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, trained=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.prompt_format is not None:
            self.prompt_format.save(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        with sharding.checkpoint_without_frozen_weights(self):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if str(resume_from_checkpoint) != self._loaded_before_sharding:
            model = self.accelerator.unwrap_model(model or self.model)
            sharding.load_trained_weights(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and is_model_dir(best):
            sharding.load_trained_weights(self.accelerator.unwrap_model(self.model), best)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        mixing = list(model.mixing.parameters()) if model.mixing is not None else []
        with sharding.gathered(mixing):  # every process logs; the callbacks read the ratios too
            ratios = model.mixing_ratios()
            if ratios["k"] and ("loss" in logs or "eval_loss" in logs):
                logs["alpha_k_mean"] = sum(ratios["k"]) / len(ratios["k"])
                logs["alpha_v_mean"] = sum(ratios["v"]) / len(ratios["v"])
            super().log(logs, start_time)


class BituneTrainer(BituneTrainerMixin, Trainer):
    """The Hugging Face Trainer for a BituneModel (see `BituneTrainerMixin`)."""

    def __init__(self, *args, prompt_format: PromptFormat | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_format = prompt_format


def training_arguments(config: RunConfig) -> TrainingArguments:
    """The Trainer's arguments for a run config (AdamW, linear schedule with warmup, weight decay 0, ...),
    with ``training.trainer_args`` passed through.

    Raises:
        ValueError: if transformers rejects a value (before any model or data loads).
    """
    t = config.training
    report_to = [r for r in t.report_to if r != "none"] or "none"
    evaluating = config.data.eval is not None
    eval_settings = {}
    if evaluating:
        eval_settings = dict(
            eval_strategy="steps", eval_steps=t.eval_steps or t.save_steps, prediction_loss_only=True
        )
    if t.early_stopping_patience:
        eval_settings.update(
            load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False
        )
    settings = dict(
        output_dir=t.output_dir,
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
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
        use_cpu=not torch.cuda.is_available(),
        **eval_settings,
    )
    try:
        return TrainingArguments(**{**settings, **t.trainer_args})
    except (ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if t.trainer_args:
            raise ValueError(
                f"training.trainer_args {dict(t.trainer_args)}: transformers refuses them: {first}"
            ) from None
        # a launch setting (an accelerate or DeepSpeed config), not a field of the run config
        raise ValueError(f"transformers refuses the training arguments: {first}") from None


def holds_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a run's results: a trained model or a checkpoint (a run that failed
    before its first checkpoint leaves neither, and may be started again)."""
    return is_model_dir(output_dir) or bool(checkpoints(output_dir))


def train(config: RunConfig, resume: bool = False, allow_changes: tuple[str, ...] | list[str] = ()) -> Path:
    """Train one run and return its directory (which then holds the trained model).

    The run directory is locked for the whole run (one writer at a time). Nothing is written into it until
    the model and data are loaded and training starts; a run that stops before that leaves no trace.

    Args:
        config: a validated run config (`bitune.training.run_config.load_run_config`).
        resume: continue from the newest complete checkpoint in ``training.output_dir`` (fresh start if
            none). The config must mean the same run as the saved one (`bitune.training.guard.resume_changes`).
        allow_changes: fields a resume may change to train more (``training.max_steps``,
            ``training.num_epochs``); recorded in ``resumes.jsonl``.

    Raises:
        FileExistsError: if the run directory already holds a run and ``resume`` is False, or another
            process is training into it.
        ValueError: for a resume with a config that changes what the checkpoint means.
        callbacks.TrainingDiverged: at the first update whose gradient or weights are not finite.
    """
    compat.check_trainer()
    output_dir = Path(config.training.output_dir)
    if not resume and holds_run(output_dir):  # before the lock too: never hold it only to refuse
        raise FileExistsError(
            f"{output_dir} already holds a run; pass resume=True (--resume) or another output_dir"
        )
    created = not output_dir.exists()
    started = False
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun/accelerate set RANK per process
    lock = RunLock(output_dir) if main_process else contextlib.nullcontext()
    try:
        with lock:
            checkpoint, changes = None, {}
            if resume:
                checkpoint = latest_complete_checkpoint(output_dir, discard_incomplete=main_process)
                if checkpoint is not None:
                    step = trained_steps(checkpoint)
                    changes = resume_changes(config, output_dir, step, allow_changes)
            elif holds_run(output_dir):  # another writer made it while this one waited for nothing
                raise FileExistsError(
                    f"{output_dir} already holds a run; pass resume=True (--resume) or another output_dir"
                )
            trainer = _build_trainer(config)
            if main_process:
                if changes:
                    print(f"resuming {checkpoint} with changed fields: {changes}")
                    record_resume(output_dir, str(checkpoint), changes)
                trim_logs(output_dir, trained_steps(checkpoint) if checkpoint else 0)
                save_run_config(config, output_dir / RUN_CONFIG)
                trainer.prompt_format.save(output_dir)
            started = True
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            trainer.save_model(str(output_dir))
            trainer.save_state()  # trainer_state.json: the steps trained and the log history
            if main_process:
                write_model_card(output_dir)
    finally:
        if created and not started and main_process and output_dir.exists():
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing of a run that never started stays
    return output_dir


def _build_trainer(config: RunConfig) -> BituneTrainer:
    """Load the model and data and wire the Trainer (nothing is written to the run directory)."""
    output_dir = Path(config.training.output_dir)
    args = training_arguments(config)  # transformers' own checks, before anything loads
    set_seed(config.training.seed)  # adapters' initialisation
    model, tokenizer = load_model(
        config.model.name,
        dtype=resolve_dtype(config.model.dtype),
        attn_implementation=config.model.attn_implementation,
    )
    rows, eval_rows, prompt_format = training_data(config, tokenizer)
    with sharding.gathered(list(model.parameters())):  # ZeRO-3 partitioned the base model as it loaded
        bitune_model = get_bitune_model(model, config.bitune_config())
    callbacks = [
        FiniteCheck(bitune_model, output_dir),
        MixingLogCallback(bitune_model, output_dir, "tensorboard" in config.training.report_to),
    ]
    if config.training.snapshot_steps:
        callbacks.append(
            SnapshotCallback(bitune_model, output_dir, config.training.snapshot_steps, prompt_format)
        )
    if config.training.early_stopping_patience:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=config.training.early_stopping_patience)
        )
    return BituneTrainer(
        model=bitune_model,
        args=args,
        train_dataset=rows,
        eval_dataset=eval_rows,
        data_collator=BituneCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
            config.training.optimizer, config.training.learning_rate
        ),
        prompt_format=prompt_format,
    )


def training_data(config: RunConfig, tokenizer) -> tuple[list[dict], list[dict] | None, PromptFormat]:
    """(training rows, evaluation rows or None, the prompt format) of a run config.

    Raises:
        ValueError: if no training row is left.
    """
    d = config.data
    options = dict(
        data_source=d.source,
        data_format=d.format,
        max_length=d.max_length,
        template=d.template,
        turns=d.turns,
        choices=d.choices,
        prompt_repeat=d.prompt_repeat,
    )
    rows, prompt_format = [], None
    for source in d.sources:  # several sources train together: they must write prompts alike
        loaded = load_rows(source, tokenizer, split=d.split, subset=d.subset, limit=d.limit, **options)
        if prompt_format is not None and loaded.prompt_format != prompt_format:
            raise ValueError(
                f"data.train: {source!r} writes prompts as {loaded.prompt_format.template!r}, the sources before "
                f"it as {prompt_format.template!r}; set data.template so that they agree"
            )
        rows, prompt_format = rows + loaded.rows, loaded.prompt_format
    if not rows:
        raise ValueError(f"no training rows left from {d.train!r} (see the summary above)")
    eval_rows = None
    if d.eval_fraction is not None:
        order = list(range(len(rows)))
        random.Random(config.training.seed).shuffle(order)
        held_out = set(order[: max(1, round(d.eval_fraction * len(rows)))])
        eval_rows = [r for i, r in enumerate(rows) if i in held_out]
        rows = [r for i, r in enumerate(rows) if i not in held_out]
        print(f"held out {len(eval_rows)} of {len(rows) + len(eval_rows)} rows for evaluation (data.eval)")
    elif d.eval is not None:
        split = "eval" if d.eval in TASKS else d.split
        template = prompt_format.template if d.eval not in TASKS else "paper"
        eval_options = {**options, "template": template}
        eval_rows = load_rows(
            d.eval, tokenizer, split=split, subset=d.subset, limit=d.eval_limit, **eval_options
        ).rows
    if eval_rows is not None and not eval_rows:
        raise ValueError(f"no evaluation rows left from data.eval {d.eval!r}")
    return rows, eval_rows, prompt_format
