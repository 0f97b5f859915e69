"""Protecting a run directory: one writer at a time, resumes that mean what they say, logs without repeats.

- `RunLock`: an exclusive lock (``filelock``) on the run directory for as long as a training process
  writes to it; a second ``bitune train`` on the same directory fails at once, naming the holder.
- `resume_changes`: what a resumed run changes against the config saved in the run directory. Changes that
  alter what the checkpoint means (another base model, method, data, learning rate, schedule, seed, ...)
  are refused; bookkeeping fields (logging, saving, snapshots, speed and memory options:
  `RunConfig.bookkeeping_fields`) may change; more training
  (``training.max_steps``, ``training.num_epochs``) only when allowed explicitly, and never below the
  checkpoint's step.
- `trim_logs`: a resumed run continues its logs from the checkpoint's step, so each step is logged once.
"""

from __future__ import annotations

import csv
import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from ..layout import LOG_CSV, LOG_JSONL, RUN_CONFIG
from .run_config import RunConfig

LOCK_NAME = ".bitune.lock"
HOLDER_NAME = ".bitune.lock.json"
# Fields a resume may change only when asked to (``--allow-change``): more training of the same run.
EXTENDABLE = {"training.max_steps", "training.num_epochs"}


class RunDirectoryLocked(FileExistsError):
    """Another process is writing to the run directory."""


class RunLock:
    """Exclusive lock on a run directory while a training process writes to it (non-blocking)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.lock = FileLock(str(self.directory / LOCK_NAME), timeout=0)

    def __enter__(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise RunDirectoryLocked(
                f"{self.directory} is being written by another training process ({self._holder()}); wait for it "
                "or use another training.output_dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "user": getpass.getuser(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        }
        (self.directory / HOLDER_NAME).write_text(json.dumps(holder) + "\n")
        return self

    def __exit__(self, *exc_info) -> None:
        (self.directory / HOLDER_NAME).unlink(missing_ok=True)
        self.lock.release()

    def _holder(self) -> str:
        try:
            holder = json.loads((self.directory / HOLDER_NAME).read_text())
        except (OSError, ValueError):
            return "holder unknown"
        return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}: {holder.get('command')}"


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "peft":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(
    config: RunConfig, run_dir: str | Path, checkpoint_step: int, allow: tuple[str, ...] | list[str] = ()
) -> dict[str, tuple[Any, Any]]:
    """What ``config`` changes against the config saved in ``run_dir``, as ``field -> (saved, new)``.

    Raises:
        ValueError: for a change that alters what the checkpoint means, a step budget below the
            checkpoint's step, or an allowed field that is not extendable.
    """
    unknown = sorted(set(allow) - EXTENDABLE)
    if unknown:
        raise ValueError(f"--allow-change takes {sorted(EXTENDABLE)}, got {unknown}")
    path = Path(run_dir) / RUN_CONFIG
    try:
        saved_node = OmegaConf.load(path)
        saved = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(RunConfig), saved_node))
    except Exception as exc:  # a damaged record cannot vouch for the checkpoint
        raise ValueError(
            f"{path} cannot be read ({type(exc).__name__}); the run cannot be resumed safely"
        ) from None
    before, after = _flat(saved), _flat(config.to_dict())
    changes = {
        k: (before.get(k), after.get(k))
        for k in sorted(set(before) | set(after))
        if before.get(k) != after.get(k)
    }
    bookkeeping = config.bookkeeping_fields()
    refused = {k: v for k, v in changes.items() if k not in bookkeeping and k not in allow}
    if refused:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        hint = " (more training? pass --allow-change for it)" if set(refused) <= EXTENDABLE else ""
        raise ValueError(
            f"--resume would continue {run_dir} with another config: {detail}{hint}; these change what its "
            "checkpoint means: use another training.output_dir for a new run"
        )
    max_steps = after["training.max_steps"]
    if 0 < max_steps < checkpoint_step:
        raise ValueError(
            f"training.max_steps={max_steps} is below the step of the checkpoint to resume ({checkpoint_step})"
        )
    return changes


def trim_logs(run_dir: str | Path, last_step: int) -> None:
    """Drop log records after ``last_step`` (all of them for 0), so a resumed run logs each step once."""
    run_dir = Path(run_dir)
    jsonl, table = run_dir / LOG_JSONL, run_dir / LOG_CSV
    if jsonl.is_file():
        kept = [
            line
            for line in jsonl.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= last_step
        ]
        jsonl.write_text("".join(line + "\n" for line in kept))
    if table.is_file():
        with open(table, newline="") as handle:
            rows = list(csv.DictReader(handle))
        fields = list(rows[0]) if rows else []
        rows = [row for row in rows if int(row.get("step") or 0) <= last_step]
        with open(table, "w", newline="") as handle:
            if rows:
                writer = csv.DictWriter(handle, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
    if last_step == 0:
        jsonl.unlink(missing_ok=True)
        table.unlink(missing_ok=True)


def record_resume(run_dir: str | Path, checkpoint: str | None, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append a resume and the config changes it made to ``resumes.jsonl`` (the record of what ran)."""
    entry = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "checkpoint": checkpoint,
        "changes": {k: list(v) for k, v in changes.items()},
    }
    with open(Path(run_dir) / "resumes.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
