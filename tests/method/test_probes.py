"""probes.py: what a base model supports, found by running it, and the refusals it raises."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitune.method.masks import explicit_mask, prompt_pass_kwargs
from bitune.method.probes import (
    BaseModelSupport,
    mask_problem,
    modules_without_kv_influence,
    plain_lm_head,
    probe_base_model,
)

from conftest import tiny_model


@pytest.mark.parametrize(
    ("arch", "plain"), [("llama", True), ("gemma3_text", True), ("gpt2", True), ("gemma2", False)]
)
def test_plain_lm_head_probe(arch, plain):
    """Gemma 2 soft-caps its logits, so they are not its head's output: the probe must say so."""
    assert plain_lm_head(tiny_model(arch)) is plain


def test_kv_reachability_finds_the_last_layers_non_kv_modules_and_the_head():
    unreachable, layers = modules_without_kv_influence(tiny_model("llama"))
    assert layers == 3
    assert "lm_head" in unreachable and "model.layers.2.self_attn.q_proj" in unreachable
    assert "model.layers.2.self_attn.k_proj" not in unreachable  # feeds the last layer's cached keys
    assert not any(name.startswith("model.layers.1.") for name in unreachable)


def test_mask_problem_sees_whether_a_mask_reaches_later_tokens():
    model = tiny_model("llama")
    padding = torch.ones((1, 3), dtype=torch.long)
    assert (
        mask_problem(model, prompt_pass_kwargs("bidirectional", padding, model.config, model.dtype)) is None
    )
    assert mask_problem(model, prompt_pass_kwargs("causal", padding, model.config, model.dtype)) == (
        "the mask is ignored: no token sees a later one"
    )
    explicit = {"attention_mask": explicit_mask(["anti_causal"], padding, model.config, model.dtype)}
    assert mask_problem(model, explicit) is None
    bloom = tiny_model("bloom", n_embed=32)  # builds its own causal mask from the alibi path
    assert "ignored" in mask_problem(
        bloom, prompt_pass_kwargs("bidirectional", padding, bloom.config, bloom.dtype)
    )
    assert model.training is False  # probes leave the mode as they found it


def test_support_is_frozen_and_records_explicit_masks_where_is_causal_is_dropped():
    support = probe_base_model(tiny_model("stablelm"), ["causal", "bidirectional"])
    assert support.explicit_masks == {"bidirectional"} and support.stacking_problem is None
    assert probe_base_model(tiny_model("llama"), ["causal", "bidirectional"]).explicit_masks == set()
    with pytest.raises(dataclasses.FrozenInstanceError):
        support.head_is_plain = False
    assert isinstance(support, BaseModelSupport) and support.num_cache_layers == 3


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="PreTrainedModel, got Linear"):
        probe_base_model(torch.nn.Linear(2, 2), ["causal"])
    with pytest.raises(ValueError, match="BloomForCausalLM cannot run the anti_causal prompt pass"):
        probe_base_model(tiny_model("bloom", n_embed=32), ["causal", "anti_causal"])
