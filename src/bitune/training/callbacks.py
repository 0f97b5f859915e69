"""What bitune adds to a Hugging Face training loop, as Trainer callbacks:

- `MixingLogCallback`: every training log (loss, learning rate, per-layer mixing ratios) to ``log.jsonl``
  and ``log.csv`` in the run directory, and the ratios to TensorBoard; never a NaN or Infinity in the JSON;
- `SnapshotCallback`: the trained weights after chosen updates in ``snapshots/step-N``;
- `FiniteCheck`: training stops at the first update whose gradient or weights are not finite, with an
  error naming the update; the checkpoints saved before it stay (a diverged model is never saved).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..data import PromptFormat
from ..layout import LOG_CSV, LOG_JSONL, is_model_dir, latest_complete_checkpoint, snapshot_dir
from .sharding import all_processes_agree, gathered_trained_weights, local

if TYPE_CHECKING:
    from ..method.model import BituneModel


class TrainingDiverged(RuntimeError):
    """A gradient or trained weight became NaN or infinite."""


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class FiniteCheck(TrainerCallback):
    """Raises `TrainingDiverged` at the first update whose gradient (before the optimizer step) or trained
    weights (after it) are not finite."""

    def __init__(self, model: BituneModel, output_dir: str | Path) -> None:
        self.model = model
        self.output_dir = Path(output_dir)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _stop(self, step: int, what: str) -> None:
        latest = latest_complete_checkpoint(self.output_dir)
        kept = (
            f"the last checkpoint before it, {latest}, is kept"
            if latest
            else "no checkpoint was saved before it"
        )
        raise TrainingDiverged(
            f"training stopped at update {step}: {what} (NaN or inf); {kept}. Lower training.learning_rate "
            "(or check the data) and start a new run"
        )

    @staticmethod
    def _finite(tensors: list[torch.Tensor]) -> bool:
        """Whether every tensor is finite on every process (each checks its shards)."""
        finite = not tensors or bool(torch.stack([torch.isfinite(local(t)).all() for t in tensors]).all())
        return all_processes_agree(finite)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._finite([p.grad for p in self._trainable() if p.grad is not None]):
            self._stop(state.global_step + 1, "the gradient is not finite")

    def on_step_end(self, args, state, control, **kwargs):
        if not self._finite(self._trainable()):
            self._stop(state.global_step, "the trained weights are not finite after the optimizer step")


class MixingLogCallback(TrainerCallback):
    """Appends every training log (loss, learning rate, per-layer alpha_k / alpha_v) to ``log.jsonl`` and
    ``log.csv`` in the run directory, every evaluation (eval loss beside the ratios) to ``log.jsonl``, and
    the per-layer ratios to TensorBoard when it is enabled."""

    def __init__(self, model: BituneModel, output_dir: str | Path, tensorboard: bool) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.tensorboard = tensorboard
        self.writer = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or ("loss" not in logs and "eval_loss" not in logs):
            return
        ratios = self.model.mixing_ratios()
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            **logs,
            "alpha_k": ratios["k"],
            "alpha_v": ratios["v"],
        }
        record = _json_safe(record)
        with open(self.output_dir / LOG_JSONL, "a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if "loss" in logs:  # the CSV holds the training records (evaluations are in the JSONL)
            self._append_csv(record)
        if self.tensorboard and ratios["k"]:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "runs" / "mixing"))  # beside the Trainer's
            for kind in ("k", "v"):
                for i, alpha in enumerate(ratios[kind]):
                    self.writer.add_scalar(f"mixing/alpha_{kind}/layer_{i:02d}", alpha, state.global_step)
            self.writer.flush()

    def _append_csv(self, record: dict) -> None:
        flat = {k: v for k, v in record.items() if not isinstance(v, list)}
        for kind in ("k", "v"):
            flat.update({f"alpha_{kind}_{i:02d}": a for i, a in enumerate(record[f"alpha_{kind}"])})
        path = self.output_dir / LOG_CSV
        header = (
            path.read_text().splitlines()[0].split(",") if path.is_file() and path.stat().st_size else None
        )
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header or list(flat), extrasaction="ignore")
            if header is None:
                writer.writeheader()
            writer.writerow(flat)

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()


class SnapshotCallback(TrainerCallback):
    """Saves the model's trained weights after each of ``steps`` updates into `snapshot_dir` (0: before
    the first update). A snapshot that exists is kept, so a resumed run does not rewrite it; at
    ``on_train_begin`` the model holds its initial weights even when resuming (the Trainer loads a
    checkpoint after that event)."""

    def __init__(
        self,
        model: BituneModel,
        output_dir: str | Path,
        steps: list[int],
        prompt_format: PromptFormat | None = None,
    ) -> None:
        self.model = model
        self.output_dir = Path(output_dir)
        self.steps = set(steps)
        self.prompt_format = prompt_format

    def _snapshot(self, state, step: int) -> None:
        folder = snapshot_dir(self.output_dir, step)
        if step not in self.steps or not all_processes_agree(not is_model_dir(folder)):
            return
        trained = gathered_trained_weights(self.model)  # on every process
        if state.is_world_process_zero:
            if self.prompt_format is not None:
                self.prompt_format.save(folder)
            self.model.save_pretrained(folder, trained=trained)

    def on_train_begin(self, args, state, control, **kwargs):
        self._snapshot(state, 0)

    def on_step_end(self, args, state, control, **kwargs):
        self._snapshot(state, state.global_step)
