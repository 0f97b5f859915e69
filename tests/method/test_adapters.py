"""adapters.py: switching a pass's adapter never changes what trains; per-row routing is exact."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from bitune.method.adapters import (
    AdapterSwitch,
    adapter_parameters,
    adapter_state_dict,
    create_peft_model,
    load_adapter_state_dict,
    with_excluded_modules,
)

from conftest import tiny_model


def two_adapters(**lora):
    config = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False, **lora)
    model = create_peft_model(tiny_model("llama"), {"causal": config, "bidir": config})
    return model, AdapterSwitch(model)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_both_adapters_train_and_switching_leaves_requires_grad_alone():
    model, switch = two_adapters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model, ["causal", "bidir"])) and trainable
    with switch.use("bidir"):
        assert switch.current == "bidir"
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert switch.current == "causal"
    assert all(layer.active_adapters == ["causal"] for layer in switch.layers)  # a plain forward still works


def test_use_restores_the_previous_adapter_after_an_error():
    _, switch = two_adapters()
    with pytest.raises(RuntimeError, match="boom"), switch.use("bidir"):
        raise RuntimeError("boom")
    assert switch.current == "causal"


def test_per_row_routing_gives_each_row_its_own_adapter():
    model, switch = two_adapters()
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = []
    for row, name in enumerate(["causal", "bidir"]):
        with switch.use(name):
            expected.append(logits(model, ids[row : row + 1]))
    with switch.per_row(["causal", "bidir"]):
        both = logits(model, ids)
    torch.testing.assert_close(both, torch.cat(expected), atol=1e-5, rtol=1e-4)
    assert switch.current == "causal"


def test_per_row_routing_refuses_dora():
    _, switch = two_adapters(use_dora=True)
    assert not switch.can_route_rows
    with pytest.raises(ValueError, match="plain LoRA"), switch.per_row(["causal", "bidir"]):
        pass


def test_excluded_modules_extend_either_form_of_exclude_modules():
    names = ["model.layers.2.mlp.up_proj", "lm_head"]
    as_set = with_excluded_modules(LoraConfig(exclude_modules=["x"]), names)
    assert as_set.exclude_modules == {"x", *names}
    as_regex = with_excluded_modules(LoraConfig(exclude_modules=".*gate.*"), names)
    assert as_regex.exclude_modules == r"(?:.*gate.*)|(?:model\.layers\.2\.mlp\.up_proj|lm_head)"


def test_state_dicts_round_trip_and_wrong_sizes_are_refused():
    model, _ = two_adapters()
    weights = adapter_state_dict(model, "causal")
    other, _ = two_adapters()
    load_adapter_state_dict(other, "causal", weights)
    for name, value in adapter_state_dict(other, "causal").items():
        torch.testing.assert_close(value, weights[name])
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in weights.items()}
    with pytest.raises(ValueError, match="adapter 'causal': the saved weights do not fit"):
        load_adapter_state_dict(other, "causal", wrong)
