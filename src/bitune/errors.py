"""Errors that tell the user what to fix (the command line exits with status 2 for them, not 1)."""

from __future__ import annotations


class PackageMissingError(RuntimeError):
    """A packaged model or dataset was asked for but its package is not installed."""


INPUT_ERRORS = (
    ValueError,
    LookupError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    PackageMissingError,
)
