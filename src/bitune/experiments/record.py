"""The report of a grid, ``results.json`` in its report folder: the record of every finished run.

Each run is kept under its key (``[<task>/]<method>/seed<k>``) with

    fingerprint   what its scores depend on (CompareConfig.fingerprint): a run is reused only if it matches
    scores        eval task -> headline score, stderr, n (the final model)
    curve         update -> eval task -> scores (the snapshots of ``evaluation.curve_steps``)
    steps         updates the final model was trained for
    commits       the bitune source the run was trained and scored with (``-dirty``: uncommitted changes)
    commands      the commands that ran it (more than one if it was resumed or scored later)
    seconds       wall time of training and of scoring

The report is rewritten after every finished run, and the run's training log is copied beside it
(``logs/<key>.jsonl``), so a committed report folder holds everything its tables and plots are made from:
a grid continues on a fresh machine from what was committed, without the run directories.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPORT_NAME = "results.json"
LOGS = "logs"


def source_commit() -> str | None:
    """The git commit of the bitune source in use (``-dirty`` with uncommitted changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if status else "")


def current_command() -> str:
    """The command line of this process, with the program's name only (no machine paths)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m <package>
        program = f"python -m {Path(sys.argv[0]).parent.name}"
    elif program in ("-c", ""):
        program = "python"
    return " ".join([program, *sys.argv[1:]])


class GridReport:
    """The runs recorded in a report folder; see the module docstring."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / REPORT_NAME
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.runs: dict[str, dict[str, Any]] = dict(saved.get("runs", {}))

    def reusable(self, key: str, fingerprint: str) -> dict[str, Any]:
        """The recorded run ``key`` if it was made with ``fingerprint`` (else an empty record)."""
        run = self.runs.get(key)
        if run is None or run.get("fingerprint") != fingerprint:
            return {}
        return run

    def record(self, key: str, run: dict[str, Any], log: Path | None = None) -> None:
        """Keep ``run`` under ``key`` and copy its training log beside the report."""
        self.runs[key] = run
        if log is not None and log.is_file():
            target = self.log_path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(log, target)

    def log_path(self, key: str) -> Path:
        return self.folder / LOGS / f"{key}.jsonl"

    def read_log(self, key: str) -> list[dict]:
        """The run's training log records, one per step (a step logged twice, by a run resumed before
        logs were deduplicated, keeps its last record)."""
        path = self.log_path(key)
        if not path.is_file():
            return []
        by_step = {}
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_step[record.get("step"), "eval_loss" in record] = record
        return list(by_step.values())

    def write(self, summary: dict[str, Any]) -> Path:
        """Write ``summary`` plus the run records to ``results.json`` (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / REPORT_NAME
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps({**summary, "runs": self.runs}, indent=2, sort_keys=False) + "\n")
        staging.replace(path)
        return path
