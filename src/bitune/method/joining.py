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

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

JOINED = "bitune_joined"  # the attention implementation a joined forward runs with
_active = threading.local()  # the joined forward's cache, while it runs


class JoinedCache(DynamicCache):
    """The cache of a joined forward: its own layers hold the prompt rows' keys and values (``rows`` rows of
    ``width`` tokens, the first ``rows * width`` tokens of the flattened sequence); the decoding tokens (the
    rest, one per row of ``decoding``) are appended to ``decoding``."""

    def __init__(self, decoding: DynamicCache, rows: int, width: int, config) -> None:
        super().__init__(config=config)
        self.decoding, self.rows, self.width = decoding, rows, width
        self.attend: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        split = self.rows * self.width
        (prompt_k, decode_k), (prompt_v, decode_v) = (
            (self._prompt_rows(t[0, :, :split]), t[0, :, split:].transpose(0, 1)[:, :, None])
            for t in (key_states, value_states)
        )
        keys, values = self.layers[layer_idx].update(prompt_k, prompt_v)
        cached_k, cached_v = self.decoding.layers[layer_idx].update(decode_k, decode_v)
        self.attend[layer_idx] = (keys, values, cached_k, cached_v)
        return key_states, value_states

    def _prompt_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """(heads, rows * width, dim) -> (rows, heads, width, dim)"""
        return flat.reshape(flat.shape[0], self.rows, self.width, flat.shape[-1]).transpose(0, 1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decoding.get_seq_length(layer_idx)


def joined_attention(module: nn.Module, query: torch.Tensor, key, value, attention_mask, **kwargs):
    """Attention of a joined forward, group by group (see the module docstring); plain sdpa otherwise."""
    cache: JoinedCache | None = getattr(_active, "cache", None)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    keys, values, cached_k, cached_v = cache.attend[module.layer_idx]
    heads, split = query.shape[1], cache.rows * cache.width
    prompt_q = cache._prompt_rows(query[0, :, :split])  # (rows, heads, width, dim)
    decode_q = query[0, :, split:].transpose(0, 1)[:, :, None]  # (batch, heads, 1, dim)
    prompt_out, _ = sdpa_attention_forward(module, prompt_q, keys, values, cache.prompt_mask, **kwargs)
    decode_out, _ = sdpa_attention_forward(module, decode_q, cached_k, cached_v, cache.decode_mask, **kwargs)
    out = torch.cat(
        [prompt_out.reshape(split, heads, -1), decode_out.reshape(-1, heads, decode_out.shape[-1])]
    )
    return out[None], None


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
    caches from `BituneModel.decode_joining` as from `decode` and `prefill_tokens` apart (fp32: 1e-4)."""
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
    try:
        logits, joined = model.decode_joining(batch.cache, *step, newcomers)
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
    ]
    return torch.allclose(logits, apart[0], rtol=tolerance, atol=tolerance) and all(
        close(mine.keys, theirs.keys, real) and close(mine.values, theirs.values, real)
        for ours, expected, real in caches
        for mine, theirs in zip(ours.layers, expected.layers, strict=True)
    )
