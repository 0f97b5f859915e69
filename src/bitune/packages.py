"""What bitune needs from its environment: optional packages (named with the command that installs them)
and the folder where it caches converted packaged models.

A missing optional package is an input error (`PackageMissingError`, exit status 2 on the command line),
reported before any expensive work with the exact install command.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CACHE_ENV = "BITUNE_CACHE_DIR"


class PackageMissingError(RuntimeError):
    """A packaged model or dataset, or an optional feature, was asked for but its package is not installed."""


def require_package(module: str, install: str, what: str) -> None:
    """Raise `PackageMissingError` naming the install command if ``module`` is not importable."""
    if importlib.util.find_spec(module) is None:
        raise PackageMissingError(
            f"{what} needs the Python package '{module}', which is not installed. Run: {install}"
        )


def cache_dir() -> Path:
    """Root of bitune's cache: ``$BITUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitune``, else ``~/.cache/bitune``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bitune"
