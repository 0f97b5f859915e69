"""Errors that tell the user what to fix (the command line exits with status 2 for them, not 1)."""

from __future__ import annotations

from .packages import PackageMissingError

INPUT_ERRORS = (
    ValueError,
    LookupError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PackageMissingError,
)
