"""Prefix caching of the causal prompt pass: prompts that share a prefix with a stored prompt compute only
their later causal columns, and still get the cache (and the next logits) of a prefill from nothing (which
also fails if the bidirectional rows reuse the prefix: their keys depend on the tokens after it); the store
is bounded."""

from __future__ import annotations

import copy

import pytest
import torch

from bitune.method.joining import started_apart
from bitune.method.prefixes import MIN_PREFIX_TOKENS, CausalPrefixes

from conftest import ARCH_NAMES, JOINS, VARIANTS, assert_same_start, bitune_pair, merged_copy, moved_thetas

SHARED = list(range(3, 3 + MIN_PREFIX_TOKENS + 4))  # a "system prompt" of 12 tokens
FIRST, SECOND, THIRD = [*SHARED, 40, 41, 42], [*SHARED, 50, 51, 52, 53, 54], [*SHARED, 60]


def merged_model(arch: str = "llama", variant: str = "bitune"):
    model, _ = bitune_pair(arch, variant=variant)
    moved_thetas(model)
    return merged_copy(model.eval())


def assert_same_prefill(model, ours, prompts) -> None:
    """``ours`` (a `Started`) holds the cache of `prefill_tokens` then `decode` of each prompt's last token
    over the real columns, and gives its first and next logits."""
    alone = started_apart(model, prompts)
    real = alone.attention_mask.bool()[:, None, :, None]
    for mine, theirs in zip(ours.cache.layers, alone.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys * real, theirs.keys * real, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.values * real, theirs.values * real, atol=1e-5, rtol=1e-5)
    assert_same_start(model, ours, alone)


@pytest.mark.parametrize("arch", [a for a in ARCH_NAMES if JOINS.get(a, True)])  # the others never join
@torch.no_grad()
def test_prompts_sharing_a_cached_prefix_get_the_cache_of_a_prefill_from_nothing(arch):
    model, prefixes = merged_model(arch), CausalPrefixes()
    model.prefill_joined([FIRST], prefixes)
    assert prefixes.hits == 0 and prefixes.tokens == len(FIRST) - 1
    prompts = [SECOND, THIRD, FIRST]  # widths 16, 12, 14 of prompt-pass tokens: left-padded 0, 4, 2
    ours = model.prefill_joined(prompts, prefixes)
    assert prefixes.hits == 1
    # SECOND's 16 columns match FIRST's first 12 tokens: 12 leading columns of every row come from the store
    assert prefixes.tokens_reused == 12 + (12 - 4) + (12 - 2)
    assert_same_prefill(model, ours, prompts)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_every_variant_reuses_only_its_causal_pass_inside_a_decoding_step(variant):
    """The causal pass of the causal adapter is reused; a variant without one (its one pass bidirectional)
    stores and reuses nothing; the step's logits are `decode`'s either way."""
    model, prefixes = merged_model(variant=variant), CausalPrefixes()
    model.prefill_joined([FIRST], prefixes)
    batch = model.prefill_tokens([[5, 9, 3, 7, 2, 8], [4, 6]])
    step = (batch.input_ids[:, -1:], batch.attention_mask, batch.positions)
    expected = model.decode(copy.deepcopy(batch.cache), *step)
    logits, joined = model.decode_joining(batch.cache, *step, [SECOND, THIRD], prefixes)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert_same_prefill(model, joined, [SECOND, THIRD])
    reuses = variant not in ("naive_bidir", "no_mixing")
    assert (prefixes.hits, bool(prefixes.tokens)) == (int(reuses), reuses)


def test_a_match_covers_what_every_row_shares_and_leaves_a_column_to_compute():
    prefixes = CausalPrefixes()
    keys = torch.arange(2 * 20 * 3, dtype=torch.float32).reshape(1, 2, 20, 3)
    prefixes.add([list(range(100, 121))], [(keys, -keys)])  # 20 prompt-pass tokens stored
    assert prefixes.match([[7] * 30], width=29) is None  # nothing shared
    assert prefixes.match([[*list(range(100, 105)), 7, 8]], width=6) is None  # 5 tokens: too short
    same = list(range(100, 121))
    assert prefixes.match([same], width=20).width == 19  # the same prompt: all but the last column
    longer, shorter = [*list(range(100, 116)), 1, 2, 3], [*list(range(100, 112)), 9]
    match = prefixes.match([longer, shorter], width=18)  # shorter starts at column 6, shares 12 tokens
    assert (match.width, match.starts) == (16, [0, 6])
    lead_k, lead_v = match.leading(0)
    assert lead_k.shape == (2, 2, 16, 3)
    torch.testing.assert_close(lead_k[0], keys[0, :, :16])
    torch.testing.assert_close(lead_k[1, :, 6:], keys[0, :, :10])
    assert not lead_k[1, :, :6].any()  # padding
    torch.testing.assert_close(lead_v, -lead_k)


def test_the_store_is_bounded_and_drops_the_least_recently_used():
    prefixes = CausalPrefixes(max_tokens=30)
    layers = [(torch.zeros(1, 1, 12, 2), torch.zeros(1, 1, 12, 2))]
    a, b, c = ([base + i for i in range(13)] for base in (100, 200, 300))
    prefixes.add([a], layers)
    prefixes.add([b], layers)
    assert prefixes.tokens == 24
    assert prefixes.match([a], width=12) is not None  # a is now the most recently used
    prefixes.add([c], layers)
    assert prefixes.tokens == 24 and set(prefixes.prefixes) == {tuple(a[:-1]), tuple(c[:-1])}
    prefixes.add([c], layers)  # stored once
    assert prefixes.tokens == 24
    with pytest.raises(ValueError, match="max_tokens"):
        CausalPrefixes(max_tokens=-1)
