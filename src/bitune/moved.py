"""Import paths from before the package had folders keep working: ``import bitune.model`` gives the module
``bitune.method.model`` itself (the same objects, so isinstance checks and monkeypatching agree), with a
``DeprecationWarning`` naming the new path. `bitune/__init__.py` installs the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

_METHOD = ("config", "masks", "mixing", "batching", "loss", "compat", "adapters", "probes", "prompt_passes",
           "generation", "saving", "model")  # fmt: skip
_TRAINING = ("callbacks", "guard", "optim", "run_config", "trl")
MOVED = {
    **{f"bitune.{name}": f"bitune.method.{name}" for name in _METHOD},
    **{f"bitune.{name}": f"bitune.training.{name}" for name in _TRAINING},
    "bitune.plots": "bitune.experiments.plots",
    "bitune.hub": "bitune.references",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a moved module under its old name; loading it puts the module at its new name in its place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # a placeholder, replaced in sys.modules by `exec_module`

    def exec_module(self, module) -> None:
        new = MOVED[module.__name__]
        warnings.warn(
            f"{module.__name__} has moved to {new}; import it from there", DeprecationWarning, stacklevel=2
        )
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
