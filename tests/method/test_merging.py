"""Merging for inference: the causal adapter in the base weights, the bidirectional pass through the exact
difference of the two adapters, decoding through the plain model. In fp32 it computes what the unmerged model
computes, on every architecture and every variant; what cannot merge keeps the unmerged path."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from bitune import BituneConfig, get_bitune_model
from bitune.method.joining import attention_configs, started_apart
from bitune.method.merging import merge_problem, without_tuners
from bitune.method.model import BituneModel
from bitune.method.prompt_passes import SMALL_PREFILL_TOKENS

from conftest import (
    JOINS,
    LENGTHS,
    PROMPTS,
    VARIANTS,
    assert_same_start,
    bitune_pair,
    make_batch,
    merged_copy,
    model_inputs,
    moved_thetas,
    tiny_model,
)


def test_merged_answer_logits_and_greedy_generation_equal_the_unmerged_model(arch):
    model, _ = bitune_pair(arch)
    moved_thetas(model)
    model.eval()
    merged = merged_copy(model)
    batch = make_batch(LENGTHS, PROMPTS)
    with torch.no_grad():
        theirs, ours = model(**model_inputs(batch)), merged(**model_inputs(batch))
    mask = theirs.answer_mask.bool()
    torch.testing.assert_close(ours.logits[mask], theirs.logits[mask], atol=1e-4, rtol=1e-4)
    prompts = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(merged.generate(prompts, **settings), model.generate(prompts, **settings))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_merges_to_the_same_cache_and_logits(variant):
    model, _ = bitune_pair("llama", variant=variant)
    moved_thetas(model)
    model.eval()
    merged = merged_copy(model)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = model.prefill(ids), merged.prefill(ids)
        for a, b in zip(theirs.layers, ours.layers, strict=True):
            torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)
        mask, positions = torch.ones(2, 9, dtype=torch.long), torch.full((2, 1), 8)
        step = ids[:, -1:]
        torch.testing.assert_close(
            merged.decode(ours, step, mask, positions),
            model.decode(theirs, step, mask, positions),
            atol=1e-4,
            rtol=1e-4,
        )


def test_the_plain_model_has_no_tuner_layers_and_shares_the_merged_weights():
    model, _ = bitune_pair("llama")
    merged = merged_copy(model)
    plain = merged._plain
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    shared = {id(p) for p in merged.parameters()}
    assert all(id(p) in shared for p in plain.parameters())
    assert not any(n.startswith("_plain") for n, _ in merged.named_parameters())  # not a submodule
    untouched = without_tuners(model.base_model)
    assert sum(p.numel() for p in untouched.parameters()) == sum(
        p.numel() for p in tiny_model("llama").parameters()
    )


def test_what_cannot_merge_keeps_the_unmerged_path_and_a_merged_model_cannot_train_or_save(tmp_path):
    dora = LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", use_dora=True)
    model = get_bitune_model(tiny_model("llama"), BituneConfig(peft_config=dora))
    assert "not plain LoRA" in merge_problem(model.adapters)
    assert not model.merge_for_inference() and not model.is_merged
    merged = merged_copy(bitune_pair("llama")[0])
    with pytest.raises(ValueError, match="cannot be saved"):
        merged.save_pretrained(tmp_path / "x")
    merged.train()
    with pytest.raises(ValueError, match="cannot train"):
        merged(**model_inputs(make_batch(LENGTHS, PROMPTS)))


def test_in_bf16_the_merged_model_decodes_as_its_own_generate():
    model, _ = bitune_pair("llama")
    moved_thetas(model)
    model = model.to(torch.bfloat16).eval()
    merged = merged_copy(model)
    assert merged.mixing.theta_k.dtype == torch.float32  # the mix stays fp32
    prompts = torch.randint(3, 60, (1, 7), generator=torch.Generator().manual_seed(3))
    output = merged.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cache = merged.prefill(prompts)  # the engine's loop: prefill, then one decode step per token
    mask, current, tokens = torch.ones(1, 7, dtype=torch.long), prompts[:, -1:], []
    for step in range(6):
        logits = merged.decode(cache, current, mask, torch.tensor([[6 + step]]))[:, -1].float()
        current = logits.argmax(-1, keepdim=True)
        tokens.append(int(current))
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    assert output[0, 7:].tolist() == tokens


def test_a_merged_model_stacks_its_small_prefills_into_one_forward_with_the_same_cache(monkeypatch):
    model, _ = bitune_pair("llama")
    moved_thetas(model)
    merged = merged_copy(model.eval())
    assert not model.prompt_passes.stacks_small and merged.prompt_passes.stacks_small
    forwards = []
    original = type(merged.prompt_passes)._forward
    monkeypatch.setattr(
        type(merged.prompt_passes),
        "_forward",
        lambda self, ids, *rest: forwards.append(len(ids)) or original(self, ids, *rest),
    )
    limit = SMALL_PREFILL_TOKENS
    for rows, width, stacked in [(2, 9, True), (2, limit // 2 + 1, True), (3, limit // 2, False)]:
        ids = torch.randint(3, 60, (rows, width), generator=torch.Generator().manual_seed(width))
        forwards.clear()
        with torch.no_grad():
            ours = merged.prefill(ids)
        # prompt tokens are every column but the last: stacked while rows * (width - 1) <= the limit
        assert forwards == ([2 * rows] if stacked else [rows, rows])
        with torch.no_grad():
            theirs = model.prefill(ids)
        for a, b in zip(theirs.layers, ours.layers, strict=True):
            torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def joined_step_agrees(model: BituneModel) -> None:
    """`decode_joining` gives `decode`'s logits for a decoding batch, and for the newcomers the first logits
    and the cache of `prefill_tokens` followed by `decode` of each one's last token (`started_apart`)."""
    batch = model.prefill_tokens([[5, 9, 3, 7, 2, 8], [4, 6]])
    newcomers = [[11, 12, 13, 14, 15], [16, 17, 18], [19]]  # a one-token prompt: only its starting token
    step = (batch.input_ids[:, -1:], batch.attention_mask, batch.positions)
    apart_cache, apart_new = copy.deepcopy(batch.cache), started_apart(model, newcomers)
    expected = model.decode(apart_cache, *step)
    logits, joined = model.decode_joining(batch.cache, *step, newcomers)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert_same_start(model, joined, apart_new)
    torch.testing.assert_close(  # the decoding batch's cache grew by the step as with decode
        model.decode(batch.cache, *_next(step)), model.decode(apart_cache, *_next(step)), atol=1e-5, rtol=1e-5
    )


def _next(step):
    current, mask, positions = step
    return current, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), positions + 1


def test_a_merged_model_prefills_newcomers_inside_a_decoding_step_where_its_check_passes(arch):
    model, _ = bitune_pair(arch)
    moved_thetas(model)
    assert not model.eval().can_join([[1, 2, 3]])  # unmerged: never
    merged = merged_copy(model)
    assert merged.can_join([[1, 2, 3]]) == JOINS.get(arch, True)
    assert not merged.can_join([[1]] * 2)  # nothing to prefill
    assert not merged.can_join([list(range(SMALL_PREFILL_TOKENS + 2))])  # a large prefill: two forwards
    if merged.can_join([[1, 2, 3]]):
        joined_step_agrees(merged)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_prefills_inside_a_decoding_step_as_apart(variant):
    model, _ = bitune_pair("llama", variant=variant)
    moved_thetas(model)
    merged = merged_copy(model.eval())
    assert merged.can_join([[1, 2, 3]])
    joined_step_agrees(merged)


def test_a_joined_forward_finds_the_attention_configs_once_and_restores_them(monkeypatch):
    """The configs a joined forward switches to its attention are found by walking the model's modules once
    (a walk per step cost as much as a step's attention); each forward restores their implementation."""
    model, _ = bitune_pair("llama")
    moved_thetas(model)
    merged = merged_copy(model.eval())
    joined_step_agrees(merged)
    configs = attention_configs(merged.base_model)
    assert configs and all(c._attn_implementation == "sdpa" for c in configs)

    def walked(*args, **kwargs):
        raise AssertionError("the modules were walked again")

    monkeypatch.setattr(merged.base_model, "modules", walked)
    joined_step_agrees(merged)
    assert attention_configs(merged.base_model) is configs
    assert all(c._attn_implementation == "sdpa" for c in configs)


@pytest.mark.slow
def test_the_packaged_smollm2_merged_for_inference_joins_and_starts_as_apart():
    """On a real model, whose logits reach about 30, the joined forward's once-per-model check passes (a
    tolerance not scaled to them once kept it from joining) and its first logits are those of a prefill
    followed by `decode` of each prompt's last token."""
    from bitune.references import load_model

    base, tokenizer = load_model("smollm2-135m-instruct")
    model = get_bitune_model(base, BituneConfig()).eval()
    assert model.merge_for_inference() and model.can_join([[1, 2, 3]])
    prompts = [tokenizer(text)["input_ids"] for text in ("The capital of France is", "Two and two make")]
    with torch.no_grad():
        ours, theirs = model.prefill_joined(prompts, None), started_apart(model, prompts)
    assert (ours.logits - theirs.logits).abs().max() <= 1e-4 * theirs.logits.abs().max()
    assert ours.logits.argmax(-1).equal(theirs.logits.argmax(-1))
