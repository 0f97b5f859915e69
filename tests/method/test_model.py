"""The correctness proof of BituneModel: equivalence with plain HF/PEFT at degenerate settings, over
every architecture of the matrix (conftest.ARCHITECTURES)."""

from __future__ import annotations

import pytest
import torch

from bitune import VARIANTS, BituneConfig, get_bitune_model
from bitune.method.masks import layer_attention_types
from bitune.method.model import BituneCausalLMOutput

from conftest import (  # LENGTHS, PROMPTS: mixed prompt and answer lengths; prompts > sliding window 4
    ARCH_NAMES,
    LENGTHS,
    PROMPTS,
    bitune_pair,
    make_batch,
    model_inputs,
    plain_peft,
    zero_thetas,
)


def first_column(batch, row: int) -> int:
    return int(batch["attention_mask"][row].argmax())


def answer_positions_in_full(batch, row: int):
    """Columns of the full sequence whose logits match answer-pass logits 0.. of ``row``."""
    start, prompt = first_column(batch, row), int(batch["prompt_lengths"][row])
    length = int(batch["attention_mask"][row].sum())
    return torch.arange(start + prompt - 1, start + length)


def assert_answer_logits_match(out: BituneCausalLMOutput, full_logits: torch.Tensor, batch, atol=1e-5):
    for row in range(full_logits.shape[0]):
        columns = answer_positions_in_full(batch, row)
        assert int(out.answer_mask[row].sum()) == len(columns)
        torch.testing.assert_close(
            out.logits[row, : len(columns)], full_logits[row, columns], atol=atol, rtol=1e-4
        )


# equivalence with plain PEFT at theta = 0 ---------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_zero_theta_equals_plain_peft_with_causal_adapter(arch, side):
    model, reference_base = bitune_pair(arch)
    zero_thetas(model)
    reference = plain_peft(reference_base, model)
    batch = make_batch(LENGTHS, PROMPTS, side=side)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        full = reference(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=(batch["attention_mask"].cumsum(1) - 1).clamp(
                min=0
            ),  # left padding + absolute positions
        ).logits
    assert_answer_logits_match(out, full, batch)


def test_zero_theta_greedy_generate_equals_plain_peft(arch):
    model, reference_base = bitune_pair(arch)
    zero_thetas(model)
    reference = plain_peft(reference_base, model)
    batch = make_batch([8, 5, 7], [8, 5, 7], side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = model.generate(batch["input_ids"], batch["attention_mask"], **kwargs)
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
    assert torch.equal(ours, theirs)


# the lora variant equals plain PEFT ---------------------------------------------------------------
def test_lora_variant_equals_plain_peft_loss_and_gradients(arch):
    model, reference_base = bitune_pair(arch, variant="lora")
    reference = plain_peft(reference_base, model)
    batch = make_batch(LENGTHS, PROMPTS)
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    reference_loss = reference(**model_inputs(batch)).loss
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
    ours = {n.removeprefix("peft_model."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-4, msg=name)


# naive bidir equals a prefix LM -------------------------------------------------------------------
def prefix_lm_mask(batch, config, dtype):
    """Additive 4D mask, built independently of bitune: bidirectional among each row's prompt tokens
    except the last (HF's symmetric inclusive window on sliding layers), causal everywhere else."""
    mask = batch["attention_mask"].bool()
    batch_size, width = mask.shape
    q = torch.arange(width)[:, None]
    k = torch.arange(width)[None, :]
    allowed = {}
    for kind in set(layer_attention_types(config)):
        rows = []
        for row in range(batch_size):
            start, prompt = first_column(batch, row), int(batch["prompt_lengths"][row])
            in_prefix = (q >= start) & (q < start + prompt - 1) & (k >= start) & (k < start + prompt - 1)
            causal = k <= q
            if kind == "sliding_attention":
                in_prefix = in_prefix & ((q - k).abs() <= config.sliding_window)
                causal = causal & (q - k < config.sliding_window)
            rows.append((in_prefix | causal) & mask[row][None, :])
        allowed[kind] = torch.stack(rows)[:, None]
    additive = {
        kind: torch.zeros(a.shape, dtype=dtype).masked_fill(~a, torch.finfo(dtype).min)
        for kind, a in allowed.items()
    }
    return additive if len(additive) > 1 else next(iter(additive.values()))


def test_naive_bidir_equals_prefix_lm_with_explicit_mask(arch):
    model, reference_base = bitune_pair(arch, variant="naive_bidir")
    reference = plain_peft(reference_base, model)
    batch = make_batch(LENGTHS, PROMPTS)
    positions = torch.arange(batch["input_ids"].shape[1])[None].expand(len(LENGTHS), -1)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        full = reference(
            input_ids=batch["input_ids"],
            attention_mask=prefix_lm_mask(batch, reference.config, torch.float32),
            position_ids=positions,
        ).logits
    assert_answer_logits_match(out, full, batch)


# what each prompt pass sees -----------------------------------------------------------------------
def prompt_cache_tensors(model, ids):
    with torch.no_grad():
        cache = model.prefill(ids)
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def changed_columns(before, after, layer):
    """Which cached columns of ``layer`` differ, as a bool per column (columns are the stored ones)."""
    (k0, v0), (k1, v1) = before[layer], after[layer]
    return ~(torch.isclose(k0, k1, atol=1e-6) & torch.isclose(v0, v1, atol=1e-6)).all(dim=(0, 1, 3))


@pytest.mark.parametrize("variant", ["bitune", "only_causal"])
def test_bidirectional_pass_lets_earlier_tokens_see_later_ones(arch, variant):
    model, _ = bitune_pair(arch, variant=variant)
    ids = make_batch([12], [12])["input_ids"]
    changed_ids = ids.clone()
    changed_ids[0, -2] = (ids[0, -2] + 1 - 3) % 90 + 3  # the last token the prompt passes read
    before, after = prompt_cache_tensors(model, ids), prompt_cache_tensors(model, changed_ids)
    sliding = set(layer_attention_types(model.config)) != {"full_attention"}
    for layer in range(len(before)):
        columns = changed_columns(before, after, layer)
        earlier = columns[:-1]  # stored columns before the changed token
        assert bool(columns[-1])  # the changed token itself
        if variant == "only_causal" or layer == 0:
            assert not bool(earlier.any()), f"layer {layer}: earlier tokens saw a later one"
        else:
            assert bool(earlier[-1]), f"layer {layer}: the token before the change did not see it"
            if not sliding:
                assert bool(earlier[0]), f"layer {layer}: the first prompt token did not see a later one"


def test_anti_causal_pass_lets_tokens_see_only_later_ones(arch):
    model, _ = bitune_pair(arch, variant="no_mixing", second_pass_mask="anti_causal")
    ids = make_batch([12], [12])["input_ids"]
    changed_ids = ids.clone()
    changed_ids[0, -3] = (ids[0, -3] + 1 - 3) % 90 + 3  # second-to-last token the prompt passes read
    before, after = prompt_cache_tensors(model, ids), prompt_cache_tensors(model, changed_ids)
    for layer in range(len(before)):
        columns = changed_columns(before, after, layer)
        assert bool(columns[-2]) and not bool(columns[-1]), f"layer {layer}: a token saw an earlier one"
        assert bool(columns[-3]) == (layer > 0), f"layer {layer}: wrong anti-causal dependency"


# padding ------------------------------------------------------------------------------------------
# every family with the full method; every variant (they share the batching code) on two families
PADDING_CASES = [(a, "bitune") for a in ARCH_NAMES] + [
    (a, v) for a in ("llama", "gemma3_text") for v in VARIANTS if v != "bitune"
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("arch", "variant"), PADDING_CASES)
def test_padded_batch_equals_rows_alone(arch, variant, side):
    model, _ = bitune_pair(arch, variant=variant)
    batch = make_batch(LENGTHS, PROMPTS, side=side, width=15)
    with torch.no_grad():
        out = model(**model_inputs(batch))
        total, count = 0.0, 0
        for row in range(len(LENGTHS)):
            single = make_batch(LENGTHS, PROMPTS)  # same seed: same tokens, unpadded row below
            length = LENGTHS[row]
            alone = model(
                input_ids=single["input_ids"][row : row + 1, :length],
                labels=single["labels"][row : row + 1, :length],
            )
            n = length - PROMPTS[row]
            torch.testing.assert_close(out.logits[row, : n + 1], alone.logits[0], atol=2e-5, rtol=1e-4)
            total, count = total + alone.loss * n, count + n
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)


# what trains --------------------------------------------------------------------------------------
OWNED = {  # variant -> (adapters, has mixing)
    "bitune": ({"causal", "bidir"}, True),
    "naive_bidir": ({"causal"}, False),
    "no_mixing": ({"causal", "bidir"}, False),
    "only_causal": ({"causal", "bidir"}, True),
    "shared_weights": ({"causal"}, True),
    "lora": ({"causal"}, False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_step_changes_exactly_what_the_variant_owns(variant):
    adapters, has_mixing = OWNED[variant]
    model, _ = bitune_pair("llama", variant=variant)
    model.train()
    assert set(model.bitune_config.adapter_names) == adapters
    assert (model.mixing is not None) == has_mixing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable = {n for n, f in flags.items() if f}
    expected = {n for n in before if adapters.intersection(n.split(".")) or n.startswith("mixing.")}
    assert trainable == expected
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**model_inputs(make_batch(LENGTHS, PROMPTS))).loss.backward()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # switching kept the flags
    unused = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert not unused, (
        f"trainable parameters without a gradient (DDP would need find_unused_parameters): {unused}"
    )
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


def test_bidir_adapter_skips_modules_that_cannot_reach_kv():
    model, _ = bitune_pair("llama")
    excluded = model.adapter_configs["bidir"].exclude_modules
    last = "model.layers.2."
    assert {f"{last}self_attn.q_proj", f"{last}self_attn.o_proj", f"{last}mlp.up_proj", "lm_head"} <= set(
        excluded
    )
    assert not any(name.startswith("model.layers.1.") for name in excluded)
    bidir = {n for n in dict(model.named_parameters()) if ".bidir." in n}
    assert any(f"{last}self_attn.k_proj" in n for n in bidir)
    assert not any(f"{last}self_attn.q_proj" in n or f"{last}mlp" in n for n in bidir)


# bf16 weights, fp32 mixing ------------------------------------------------------------------------
def test_bf16_model_keeps_thetas_and_mix_in_fp32():
    model, _ = bitune_pair("llama")
    model.to(torch.bfloat16)
    assert model.base_model.dtype == torch.bfloat16
    assert model.mixing.theta_k.dtype == torch.float32 and model.mixing.theta_v.dtype == torch.float32
    model.train()
    with model.prompt_pass_options(stack="always"):
        out = model(**model_inputs(make_batch(LENGTHS, PROMPTS)))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.mixing.theta_k.grad.dtype == torch.float32
    assert model.mixing.theta_k.grad.abs().sum() > 0


# refusals, frozen adapters, stacking --------------------------------------------------------------
def test_gradient_checkpointing_is_refused_not_silently_wrong():
    model, _ = bitune_pair("llama")
    with pytest.raises(ValueError, match=r"gradient checkpointing(.|\n)*checkpoint_prompt_passes"):
        model.gradient_checkpointing_enable()
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(**model_inputs(make_batch(LENGTHS, PROMPTS)))
    from conftest import tiny_model

    base = tiny_model("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        get_bitune_model(base, BituneConfig())


def test_forward_without_labels_or_prompt_lengths_is_an_error():
    model, _ = bitune_pair("llama")
    batch = make_batch(LENGTHS, PROMPTS)
    with pytest.raises(ValueError, match="prompt_lengths or labels"):
        model(batch["input_ids"], batch["attention_mask"])
    out = model(batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"])
    assert out.loss is None and out.logits.shape[:2] == out.answer_mask.shape


def test_a_peft_model_is_refused():
    model, _ = bitune_pair("llama")
    with pytest.raises(ValueError, match="PeftModel"):
        get_bitune_model(model.peft_model)


def test_switching_adapters_never_unfreezes_a_frozen_adapter():
    model, _ = bitune_pair("llama")
    for param in model.parameters():
        param.requires_grad_(False)
    out = model(**model_inputs(make_batch(LENGTHS, PROMPTS)), skip_logits=False)
    assert not out.logits.requires_grad and not out.loss.requires_grad
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "variant", "mask"),
    [
        ("llama", "bitune", "bidirectional"),
        ("gemma3_text", "bitune", "bidirectional"),
        ("mistral", "bitune", "anti_causal"),
        ("gemma3_text", "shared_weights", "anti_causal"),
        ("qwen2", "only_causal", None),
        ("gpt2", "bitune", "bidirectional"),
    ],
)
def test_stacked_prompt_passes_equal_passes_run_one_after_the_other(arch, variant, mask):
    model, _ = bitune_pair(arch, variant=variant, second_pass_mask=mask)
    model.train()
    batch = make_batch(LENGTHS, PROMPTS, side="left")
    outputs, grads = {}, {}
    for stack in ("always", "never"):
        model.zero_grad(set_to_none=True)
        with model.prompt_pass_options(stack=stack):
            outputs[stack] = model(**model_inputs(batch))
        outputs[stack].loss.backward()
        grads[stack] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outputs["always"].logits, outputs["never"].logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outputs["always"].loss, outputs["never"].loss, atol=1e-6, rtol=1e-5)
    for name, grad in grads["never"].items():  # each adapter learns from its own pass only
        torch.testing.assert_close(grads["always"][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert model.prompt_passes.options.stack == "auto"  # the context manager restored the model's own


def test_adapters_without_per_row_routing_run_passes_one_after_the_other():
    dora = {"peft_type": "LORA", "r": 4, "use_dora": True, "target_modules": "all-linear"}
    model, _ = bitune_pair("llama", peft_config=dora)
    assert not model.adapters.can_route_rows  # PEFT has no mixed batches for DoRA
    assert bitune_pair("llama")[0].adapters.can_route_rows
    assert not model.prompt_passes.stacked  # auto: sequential
    out = model(**model_inputs(make_batch(LENGTHS, PROMPTS)))
    assert torch.isfinite(out.loss)
    with (
        pytest.raises(ValueError, match=r"stack_prompt_passes='always' cannot stack.*routed per row"),
        model.prompt_pass_options(stack="always"),
    ):
        pass


# families that cannot run a pass are refused up front, not run silently wrong ---------------------
def test_a_model_that_ignores_every_non_causal_mask_is_refused_for_non_causal_variants():
    from conftest import tiny_model

    for variant, mask in [("bitune", "bidirectional"), ("naive_bidir", "anti_causal")]:
        with pytest.raises(ValueError, match=f"BloomForCausalLM cannot run the {mask} prompt pass"):
            get_bitune_model(
                tiny_model("bloom", n_embed=32), BituneConfig(variant=variant, second_pass_mask=mask)
            )
    lora = get_bitune_model(tiny_model("bloom", n_embed=32), BituneConfig(variant="lora"))
    assert torch.isfinite(lora(**model_inputs(make_batch(LENGTHS, PROMPTS))).loss)


def test_a_model_without_attention_caches_is_refused():
    from conftest import tiny_model

    with pytest.raises(ValueError, match="Bitune mixes per-layer attention K/V caches"):
        get_bitune_model(tiny_model("mamba"), BituneConfig())


def test_stacking_falls_back_to_sequential_passes_where_explicit_masks_fail():
    from conftest import tiny_model

    model = get_bitune_model(
        tiny_model("opt", ffn_dim=48, word_embed_proj_dim=32), BituneConfig(variant="shared_weights")
    )
    assert (
        model.support.stacking_problem and not model.support.explicit_masks
    )  # is_causal works, 4D masks do not
    batch = model_inputs(make_batch(LENGTHS, PROMPTS))
    auto = model(**batch)  # "auto" would stack the two shared-adapter passes; here it must not
    with model.prompt_pass_options(stack="never"):
        torch.testing.assert_close(auto.loss, model(**batch).loss)
    with (
        pytest.raises(ValueError, match=r"stack_prompt_passes='always' cannot stack.*per-row 4D mask"),
        model.prompt_pass_options(stack="always"),
    ):
        pass


def test_stablelm_gets_explicit_masks_for_its_bidirectional_passes():
    model, _ = bitune_pair("stablelm")
    assert model.support.explicit_masks == {"bidirectional"}
    assert bitune_pair("llama")[0].support.explicit_masks == set()
