"""BituneConfig: paper defaults, the variants' recipes, and one clear error per bad field."""

from __future__ import annotations

import json

import pytest
from peft import IA3Config, LoraConfig, PrefixTuningConfig

from bitune import VARIANTS, BituneConfig


def test_defaults_are_the_papers():
    config = BituneConfig()
    assert (config.variant, config.second_pass_mask, config.theta_init) == ("bitune", "bidirectional", 0.01)
    assert config.alpha_init == 0.5
    peft = config.peft_config
    assert isinstance(peft, LoraConfig)
    assert (peft.r, peft.lora_alpha, peft.lora_dropout, peft.target_modules) == (8, 1, 0.0, "all-linear")


@pytest.mark.parametrize(
    ("variant", "passes", "mixing", "adapters"),
    [
        ("bitune", [("causal", "causal"), ("bidir", "bidirectional")], True, ("causal", "bidir")),
        ("naive_bidir", [("causal", "bidirectional")], False, ("causal",)),
        ("no_mixing", [("bidir", "bidirectional")], False, ("causal", "bidir")),
        ("only_causal", [("causal", "causal"), ("bidir", "causal")], True, ("causal", "bidir")),
        ("shared_weights", [("causal", "causal"), ("causal", "bidirectional")], True, ("causal",)),
        ("lora", [("causal", "causal")], False, ("causal",)),
    ],
)
def test_variant_recipes(variant, passes, mixing, adapters):
    config = BituneConfig(variant=variant)
    assert [(p.adapter, p.mask) for p in config.prompt_passes] == passes
    assert config.uses_mixing is mixing
    assert config.adapter_names == adapters


def test_second_pass_mask_applies_to_the_second_pass():
    config = BituneConfig(second_pass_mask="anti_causal")
    assert [p.mask for p in config.prompt_passes] == ["causal", "anti_causal"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"variant": "bidirectional"}, "variant"),
        ({"second_pass_mask": "full"}, "second_pass_mask"),
        ({"variant": "only_causal", "second_pass_mask": "bidirectional"}, "second_pass_mask"),
        ({"theta_init": 0}, "theta_init"),
        ({"theta_init": -0.01}, "theta_init"),
        ({"theta_init": float("nan")}, "theta_init"),
        ({"theta_init": "0.01"}, "theta_init"),
        ({"theta_init": True}, "theta_init"),
        ({"alpha_init": 0}, "alpha_init"),
        ({"alpha_init": 1}, "alpha_init"),
        ({"alpha_init": -0.1}, "alpha_init"),
        ({"alpha_init": float("nan")}, "alpha_init"),
        ({"alpha_init": "0.1"}, "alpha_init"),
        ({"alpha_init": True}, "alpha_init"),
        ({"peft_config": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")}, "peft_config"),
        ({"peft_config": LoraConfig(modules_to_save=["lm_head"])}, "peft_config.modules_to_save"),
        ({"peft_config": {"r": 8}}, "peft_config"),
        ({"peft_config": {"peft_type": "LORA", "rank": 8}}, "peft_config"),
        ({"peft_config": "lora"}, "peft_config"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"BituneConfig\.{field}"):
        BituneConfig(**kwargs)


def test_dict_round_trip_through_json():
    for peft in (None, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])):
        config = BituneConfig(variant="shared_weights", theta_init=0.1, alpha_init=0.1, peft_config=peft)
        again = BituneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
    with pytest.raises(ValueError, match="unknown fields"):
        BituneConfig.from_dict({"variant": "bitune", "lr": 1e-3})


def test_every_variant_is_listed():
    assert set(VARIANTS) == {"bitune", "naive_bidir", "no_mixing", "only_causal", "shared_weights", "lora"}
