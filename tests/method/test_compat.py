"""The private PEFT, transformers and lm-eval parts bitune uses exist in the installed versions: if a
release drops one, this fails with a message naming it (and so do model building and training)."""

from __future__ import annotations

import pytest
from torch import nn

from bitune.method import compat
from bitune.method.adapters import AdapterSwitch, create_peft_model
from bitune.method.config import default_peft_config

from conftest import tiny_model


def test_installed_peft_has_what_adapter_switching_writes():
    switch = AdapterSwitch(create_peft_model(tiny_model("llama"), {"causal": default_peft_config()}))
    for layer in switch.layers:
        compat.check_peft_layer(layer)
        assert compat.lora_input_module(layer, "causal") is not None
    assert all(compat.routes_rows_exactly(layer) for layer in switch.layers)


def test_installed_trainer_has_the_methods_bitunes_trainer_overrides():
    compat.check_trainer()


def test_installed_lm_eval_has_what_the_plugin_overrides():
    from lm_eval._cli import HarnessCLI
    from lm_eval.models.huggingface import HFLM

    from bitune.evaluation.harness import HFLM_INTERNALS

    assert all(callable(getattr(HFLM, name, None)) for name in HFLM_INTERNALS)
    assert hasattr(HarnessCLI(), "_parser")


def test_a_missing_internal_fails_with_a_clear_message():
    with pytest.raises(
        compat.CompatibilityError, match=r"peft .* has no Linear\._active_adapter.*checked on peft"
    ):
        compat.check_peft_layer(nn.Linear(2, 2))
