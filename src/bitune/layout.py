"""Where things are in a run directory; the one place that knows its layout.

    RUN/
      bitune_config.json, causal/, bidir/, mixing.safetensors    the trained model (method/saving.py)
      run_config.yaml                                             what ran (training/run_config.py), resolved
      trainer_state.json                                          the Trainer's state: steps trained, log history
      log.jsonl, log.csv, runs/                                   training logs (TensorBoard under runs/)
      checkpoint-N/                                               the model + optimizer, scheduler, RNG, data position
      snapshots/step-N/                                           the model after N updates (training.snapshot_steps)
      eval/                                                       `bitune eval RUN` reports
      record.json                                                 a compare grid's scores of this run
      score-cache/                                                its scores in progress (gone once recorded)

Every folder holding ``bitune_config.json`` (the run, a checkpoint, a snapshot) is a loadable Bitune model
that records its base model, so it can be evaluated or served on its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .method.saving import CONFIG_NAME

MODEL_CONFIG = CONFIG_NAME  # the saved model's config: saving.py owns the files of a saved model
RUN_CONFIG = "run_config.yaml"
TRAINER_STATE = "trainer_state.json"
LOG_JSONL = "log.jsonl"
LOG_CSV = "log.csv"
CHECKPOINT_PREFIX = "checkpoint-"
SNAPSHOTS = "snapshots"
EVAL_DIR = "eval"
RECORD = "record.json"
SCORE_CACHE = "score-cache"  # a grid run's scores in progress (lm-eval's request cache), gone once recorded


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a saved Bitune model (a run, a checkpoint or a snapshot)."""
    return (Path(path) / MODEL_CONFIG).is_file()


def snapshot_dir(output_dir: str | Path, step: int) -> Path:
    """Where the weights after ``step`` updates are kept (a loadable Bitune model directory)."""
    return Path(output_dir) / SNAPSHOTS / f"step-{step}"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    folders = [
        p
        for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(folders, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint is complete when the Trainer's state (written after everything else) and bitune's
    config both parse."""
    try:
        json.loads((path / TRAINER_STATE).read_text())
        json.loads((path / MODEL_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return True


def latest_complete_checkpoint(output_dir: str | Path, discard_incomplete: bool = False) -> Path | None:
    """The newest complete checkpoint; with ``discard_incomplete``, newer half-written ones are removed."""
    latest = None
    for folder in checkpoints(output_dir):
        if is_complete_checkpoint(folder):
            latest = folder
        elif discard_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
    return latest


def trained_steps(output_dir: str | Path) -> int:
    """Updates the model in a finished run directory was trained for."""
    for folder in (Path(output_dir), *reversed(checkpoints(output_dir))):
        try:
            return int(json.loads((folder / TRAINER_STATE).read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            continue
    raise FileNotFoundError(f"{output_dir} has no {TRAINER_STATE}: it holds no finished training run")
