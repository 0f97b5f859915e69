"""Prefilling new prompts inside a decoding step: one forward for a batch's next tokens and newcomers' passes.

A serving engine that decodes a batch and takes in a new request would otherwise run two forwards: the new
prompt's prefill (for a merged model, both prompt passes stacked, `prompt_passes.py`) and the batch's
decoding step. On a CPU each forward has a fixed cost (the model's Python and its weights read once), so
here the tokens of both go through the layers as one flattened sequence: the decoding rows' single tokens
and the newcomers' stacked prompt rows, each token with its own position. Only attention differs per
group, and a registered attention function runs it per group, exactly as the two forwards would: the
decoding tokens over their batch's cache (its 2D padding mask), the prompt rows over their own keys with
each row's mask (causal or bidirectional, `masks.explicit_mask`). The bidirectional rows' adapter (the
difference adapter of a merged model) is routed per token; the causal rows and the decoding tokens use the
merged weights alone. Afterwards the prompt rows' caches are mixed as a stacked prefill's are.

Only for a model merged for inference whose cache layers are all plain full-attention ones; `joining_agrees`
checks once, on a small example, that the joined forward gives the two forwards' logits and cache (a
model whose attention does not go through transformers' attention interface, or adds to it, fails there
and keeps the two forwards).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .prefixes import MIN_PREFIX_TOKENS, CausalPrefixes, PrefixMatch

JOINED = "bitune_joined"  # the attention implementation a joined forward runs with
_active = threading.local()  # the joined forward's cache, while it runs


@dataclass(frozen=True)
class RowGroup:
    """Prompt rows of a joined forward that compute their last ``queries`` columns of the rows' width; the
    columns before (if any) are given by ``leading`` (a cached causal prefix, `prefixes.PrefixMatch`)."""

    rows: int
    queries: int
    leading: PrefixMatch | None = None


class JoinedCache(DynamicCache):
    """The cache of a joined forward: its own layers hold the prompt rows' keys and values (``width``
    columns each; the rows of ``groups`` in order, their tokens first in the flattened sequence, group by
    group); the decoding tokens (the rest, one per row of ``decoding``, if any) are appended to
    ``decoding``. ``prompt_mask`` is the prompt rows' (rows, 1, width, width) mask, ``decode_mask`` the
    decoding rows' padding mask."""

    def __init__(
        self,
        decoding: DynamicCache | None,
        groups: list[RowGroup],
        width: int,
        config,
        prompt_mask: torch.Tensor,
        decode_mask: torch.Tensor | None,
    ) -> None:
        super().__init__(config=config)
        self.decoding, self.groups, self.width = decoding, groups, width
        self.prompt_mask, self.decode_mask = prompt_mask, decode_mask
        self.prompt_tokens = sum(g.rows * g.queries for g in groups)
        self.attend: dict[int, tuple[torch.Tensor | None, ...]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        prompt_k, prompt_v = self._prompt_rows(key_states, value_states, layer_idx)
        keys, values = self.layers[layer_idx].update(prompt_k, prompt_v)
        cached_k = cached_v = None
        if self.decoding is not None:
            decode_k, decode_v = (
                t[0, :, self.prompt_tokens :].transpose(0, 1)[:, :, None] for t in (key_states, value_states)
            )
            cached_k, cached_v = self.decoding.layers[layer_idx].update(decode_k, decode_v)
        self.attend[layer_idx] = (keys, values, cached_k, cached_v)
        return key_states, value_states

    def _prompt_rows(
        self, keys: torch.Tensor, values: torch.Tensor, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt rows' (rows, heads, width, dim) keys and values of ``layer``: each group's computed
        columns, after its leading ones."""
        parts = []
        for group, k, v in zip(self.groups, self.split(keys), self.split(values), strict=True):
            if group.leading is not None:
                lead_k, lead_v = group.leading.leading(layer)
                k, v = torch.cat([lead_k.to(k.dtype), k], dim=2), torch.cat([lead_v.to(v.dtype), v], dim=2)
            parts.append((k, v))
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def split(self, states: torch.Tensor) -> list[torch.Tensor]:
        """(1, heads, N, dim) flattened states -> each group's (rows, heads, queries, dim) prompt rows."""
        parts, offset = [], 0
        for group in self.groups:
            flat = states[0, :, offset : offset + group.rows * group.queries]
            parts.append(
                flat.reshape(flat.shape[0], group.rows, group.queries, flat.shape[-1]).transpose(0, 1)
            )
            offset += group.rows * group.queries
        return parts

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.decoding is None else self.decoding.get_seq_length(layer_idx)


def joined_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, **kwargs):
    """Attention of a joined forward, group by group (see the module docstring); plain sdpa otherwise."""
    cache: JoinedCache | None = getattr(_active, "cache", None)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    keys, values, cached_k, cached_v = cache.attend[module.layer_idx]
    heads, outputs, row = query.shape[1], [], 0
    for group, group_q in zip(cache.groups, cache.split(query), strict=True):
        rows = slice(row, row + group.rows)
        mask = cache.prompt_mask[rows, :, -group.queries :]
        out, _ = sdpa_attention_forward(module, group_q, keys[rows], values[rows], mask, **kwargs)
        outputs.append(out.reshape(-1, heads, out.shape[-1]))
        row += group.rows
    if cache.decoding is not None:
        decode_q = query[0, :, cache.prompt_tokens :].transpose(0, 1)[:, :, None]  # (batch, heads, 1, dim)
        out, _ = sdpa_attention_forward(module, decode_q, cached_k, cached_v, cache.decode_mask, **kwargs)
        outputs.append(out.reshape(-1, heads, out.shape[-1]))
    return torch.cat(outputs)[None], None


AttentionInterface.register(JOINED, joined_attention)


@contextmanager
def running_joined(model: nn.Module, cache: JoinedCache) -> Iterator[None]:
    """Inside the block, ``model``'s attention layers run `joined_attention` over ``cache``."""
    configs = {
        id(m.config): m.config
        for m in model.modules()
        if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    previous = {key: config._attn_implementation for key, config in configs.items()}
    _active.cache = cache
    try:
        for config in configs.values():
            config._attn_implementation = JOINED
        yield
    finally:
        _active.cache = None
        for key, config in configs.items():
            config._attn_implementation = previous[key]


def all_plain_layers(cache: DynamicCache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention one (what a joined forward can append to)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.no_grad()
def joining_agrees(model) -> bool:
    """Whether ``model`` (a merged `BituneModel`) gives, on a small seeded example, the same logits and
    caches from `BituneModel.decode_joining` as from `decode` and `prefill_tokens` apart, and from
    `BituneModel.prefill_joined` reusing a cached causal prefix as from `prefill_tokens` (fp32: 1e-4)."""
    if getattr(model.base_model.config, "_attn_implementation", None) != "sdpa":
        return False
    generator = torch.Generator().manual_seed(0)
    vocab = model.base_model.get_input_embeddings().num_embeddings

    def prompt(length: int) -> list[int]:
        return torch.randint(0, vocab, (length,), generator=generator).tolist()

    batch, newcomers = model.prefill_tokens([prompt(5), prompt(3)]), [prompt(4), prompt(2)]
    if not all_plain_layers(batch.cache):
        return False
    step = (batch.input_ids[:, -1:], batch.attention_mask, batch.positions)
    apart_cache = copy.deepcopy(batch.cache)
    apart = [model.decode(apart_cache, *step), model.prefill_tokens(newcomers).cache]
    shared, prefixes = prompt(MIN_PREFIX_TOKENS + 1), CausalPrefixes()
    reusing = [shared + prompt(3), shared + prompt(1)]  # reuse the causal keys and values of shared + 1
    try:
        logits, joined = model.decode_joining(batch.cache, *step, newcomers)
        model.prefill_joined([shared + prompt(2)], prefixes)
        reused, alone = model.prefill_joined(reusing, prefixes), model.prefill_tokens(reusing)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError):  # attention it cannot run
        return False
    tolerance = 1e-4 if logits.dtype == torch.float32 else 3e-2

    def close(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor) -> bool:
        """Equal to ``tolerance`` over the real tokens' columns (a padding column holds what no one reads)."""
        a, b = (t.float() * real[:, None, :, None] for t in (a, b))
        return a.shape == b.shape and torch.allclose(a, b, rtol=tolerance, atol=tolerance)

    caches = [
        (batch.cache, apart_cache, batch.attention_mask),
        (joined.cache, apart[1], joined.attention_mask[:, :-1]),
        (reused.cache, alone.cache, reused.attention_mask[:, :-1]),
    ]
    reuses = int(model.prompt_passes.caches_causal_prefix)
    return (
        prefixes.hits == reuses
        and torch.allclose(logits, apart[0], rtol=tolerance, atol=tolerance)
        and all(
            close(mine.keys, theirs.keys, real) and close(mine.values, theirs.values, real)
            for ours, expected, real in caches
            for mine, theirs in zip(ours.layers, expected.layers, strict=True)
        )
    )
