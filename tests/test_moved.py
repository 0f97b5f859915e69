"""Import paths from before the method/ and training/ folders still import, as the same modules, with a
warning that names the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import bitune.method.model
import bitune.references
import bitune.training.run_config
from bitune.moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_is_the_moved_module_and_says_where_it_went(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} has moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__name__ == MOVED[old]  # the module itself, not a copy: monkeypatching one patches both


def test_names_from_old_paths_are_the_same_objects():
    for old in ("bitune.hub", "bitune.model", "bitune.run_config"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        from bitune.hub import load_model  # what published model cards say
        from bitune.model import BituneModel
        from bitune.run_config import RunConfig
    assert load_model is bitune.references.load_model
    assert BituneModel is bitune.method.model.BituneModel
    assert RunConfig is bitune.training.run_config.RunConfig


def test_a_fresh_interpreter_imports_an_old_path():
    code = "import warnings; warnings.simplefilter('error'); import bitune.config"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "bitune.config has moved to bitune.method.config" in result.stderr
    code = "from bitune.config import BituneConfig; print(BituneConfig().variant)"
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "bitune"
