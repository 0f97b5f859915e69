"""Prefilling new prompts inside a decoding step: one forward for a batch's next tokens, the newcomers'
prompt passes and their first answer tokens.

A serving engine that decodes a batch and takes in a new request would otherwise run three forwards: the new
prompt's prefill (for a merged model, both prompt passes stacked, `prompt_passes.py`), the first decoding
step of its last token over the mixed cache, and the batch's decoding step. On a CPU each forward has a
fixed cost (the model's Python and its weights read once), so here the tokens of all three go through the
layers as one flattened sequence: the newcomers' stacked prompt rows, the decoding rows' single tokens and
each newcomer's last prompt token (its starting token), each token with its own position. Only attention
differs per group, and a registered attention function runs it per group, exactly as the separate forwards
would: the prompt rows over their own keys with each row's mask (causal or bidirectional,
`masks.explicit_mask`), the decoding tokens over their batch's cache (its 2D padding mask), and the starting
tokens over their prompt's cache to answer from, which each layer builds from the prompt rows' keys and
values of that layer before its attention runs (mixed as a stacked prefill's are, `PromptPasses.row_mixer`):
a token's layer-l keys and values depend only on layers below l, so the mixed cache of layer l is complete
when the starting token reaches it. The bidirectional rows' adapter (the difference adapter of a merged
model) is routed per token; the causal rows and the single tokens use the merged weights alone. The result
for the newcomers (`Started`) is their cache over every prompt token and their first answer token's logits,
what `prefill_tokens` and then `decode` of the last token give.

Only for a model merged for inference whose cache layers are all plain full-attention ones; `joining_agrees`
checks once, on a small example, that the joined forward gives the separate forwards' logits and caches (a
model whose attention does not go through transformers' attention interface, or adds to it, fails there
and keeps the separate forwards).
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .prefixes import MIN_PREFIX_TOKENS, CausalPrefixes, PrefixMatch

JOINED = "bitune_joined"  # the attention implementation a joined forward runs with
_active = threading.local()  # the joined forward's cache, while it runs


class Started(NamedTuple):
    """A batch of prompts read whole (a joined forward, `BituneModel.decode_joining`): the cache to answer
    from over every prompt token, each prompt's last included, and the logits of the first answer token."""

    cache: Cache
    attention_mask: torch.Tensor  # (B, T) over the cache's columns, left-padded
    logits: torch.Tensor  # (B, V): the first answer token's

    @property
    def positions(self) -> torch.Tensor:
        """(B, 1) the position of each first answer token."""
        return self.attention_mask.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class RowGroup:
    """Prompt rows of a joined forward that compute their last ``queries`` columns of the rows' width; the
    columns before (if any) are given by ``leading`` (a cached causal prefix, `prefixes.PrefixMatch`)."""

    rows: int
    queries: int
    leading: PrefixMatch | None = None


class JoinedCache(DynamicCache):
    """The cache of a joined forward. Its tokens, in order: the prompt rows' computed columns (the rows of
    ``groups``, group by group), the decoding tokens (one per row of ``decoding``, if any) and the starting
    tokens (each newcomer's last prompt token, one per row of ``start_mask``). Its own layers hold the
    prompt rows' keys and values (the rows' width of columns each); ``mixer`` (`PromptPasses.row_mixer`) turns each
    layer of them into the newcomers' cache to answer from, which the starting tokens then extend and
    attend over (``started``); the decoding tokens are appended to ``decoding``. ``prompt_mask`` is the
    prompt rows' (rows, 1, width, width) mask, ``decode_mask`` the decoding rows' padding mask,
    ``start_mask`` the newcomers' (B, 1, 1, width + 1) padding mask."""

    def __init__(
        self,
        decoding: DynamicCache | None,
        groups: list[RowGroup],
        config,
        prompt_mask: torch.Tensor,
        decode_mask: torch.Tensor | None,
        mixer: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
        start_mask: torch.Tensor,
    ) -> None:
        super().__init__(config=config)
        self.decoding, self.groups = decoding, groups
        self.prompt_mask, self.decode_mask, self.start_mask = prompt_mask, decode_mask, start_mask
        self.mixer = mixer
        self.prompt_tokens = sum(g.rows * g.queries for g in groups)
        self.starting = len(start_mask)
        self.attend: dict[int, tuple[torch.Tensor | None, ...]] = {}
        self.started: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def column(t: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
            """(1, heads, N, dim) flattened states -> the (rows, heads, 1, dim) tokens of [start, stop)."""
            return t[0, :, start:stop].transpose(0, 1)[:, :, None]

        prompt_k, prompt_v = self._prompt_rows(key_states, value_states, layer_idx)
        keys, values = self.layers[layer_idx].update(prompt_k, prompt_v)
        ends = (self.prompt_tokens, key_states.shape[2] - self.starting)
        cached_k = cached_v = None
        if self.decoding is not None:
            cached_k, cached_v = self.decoding.layers[layer_idx].update(
                *(column(t, *ends) for t in (key_states, value_states))
            )
        mixed = self.mixer(layer_idx, keys, values)
        self.started[layer_idx] = tuple(  # type: ignore[assignment]
            torch.cat([m, column(t, ends[1], None).to(m.dtype)], dim=2)
            for m, t in zip(mixed, (key_states, value_states), strict=True)
        )
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

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        outputs.append(out.reshape(-1, heads, out.shape[-1]))

    for group, group_q in zip(cache.groups, cache.split(query), strict=True):
        rows = slice(row, row + group.rows)
        attend(group_q, keys[rows], values[rows], cache.prompt_mask[rows, :, -group.queries :])
        row += group.rows
    single = query[0, :, cache.prompt_tokens :].transpose(0, 1)[:, :, None]  # (tokens, heads, 1, dim)
    decoding = len(single) - cache.starting
    if cache.decoding is not None:
        attend(single[:decoding], cached_k, cached_v, cache.decode_mask)
    attend(single[decoding:], *cache.started[module.layer_idx], cache.start_mask)
    return torch.cat(outputs)[None], None


AttentionInterface.register(JOINED, joined_attention)


_attention_configs: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def attention_configs(model: nn.Module) -> tuple:
    """The configs whose ``_attn_implementation`` ``model``'s attention layers read (each once), found on the
    first call and kept for the model's life: walking the modules costs about as much as a decoding step's
    attention on a 135M model, and a serving engine joins every few steps."""
    if model not in _attention_configs:
        configs = {
            id(m.config): m.config
            for m in model.modules()
            if hasattr(getattr(m, "config", None), "_attn_implementation")
        }
        _attention_configs[model] = tuple(configs.values())
    return _attention_configs[model]


@contextmanager
def running_joined(model: nn.Module, cache: JoinedCache) -> Iterator[None]:
    """Inside the block, ``model``'s attention layers run `joined_attention` over ``cache``."""
    configs = attention_configs(model)
    previous = [config._attn_implementation for config in configs]
    _active.cache = cache
    try:
        for config in configs:
            config._attn_implementation = JOINED
        yield
    finally:
        _active.cache = None
        for config, implementation in zip(configs, previous, strict=True):
            config._attn_implementation = implementation


def all_plain_layers(cache: DynamicCache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention one (what a joined forward can append to)."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@torch.no_grad()
def joining_agrees(model) -> bool:
    """Whether ``model`` (a merged `BituneModel`) gives, on a small seeded example, the same logits and
    caches from `BituneModel.decode_joining` as from `decode` and `prefill_tokens` apart, and from
    `BituneModel.prefill_joined` reusing a cached causal prefix as from `prefill_tokens` (fp32: 1e-4 of
    the largest entry)."""
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
    shared, prefixes = prompt(MIN_PREFIX_TOKENS + 1), CausalPrefixes()
    reusing = [shared + prompt(3), shared + prompt(1)]  # reuse the causal keys and values of shared + 1
    apart = [model.decode(apart_cache, *step), *(started_apart(model, p) for p in (newcomers, reusing))]
    try:
        logits, joined = model.decode_joining(batch.cache, *step, newcomers)
        model.prefill_joined([shared + prompt(2)], prefixes)
        reused = model.prefill_joined(reusing, prefixes)
    except (RuntimeError, ValueError, TypeError, KeyError, AttributeError):  # attention it cannot run
        return False
    tolerance = 1e-4 if logits.dtype == torch.float32 else 3e-2

    def close(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None = None) -> bool:
        """Equal to ``tolerance`` of the larger of 1 and ``b``'s largest entry (over the real tokens'
        columns: a padding column holds what no one reads). Scaled, because a forward of other shapes sums
        in another order: on SmolLM2-135M the first logits (up to about 30) differ by 2e-4 in fp32."""
        if a.shape != b.shape:
            return False
        if real is not None:
            a, b = (t * real[:, None, :, None] for t in (a, b))
        a, b = a.float(), b.float()
        return bool((a - b).abs().max() <= tolerance * max(1.0, float(b.abs().max())))

    started = [(joined, apart[1]), (reused, apart[2])]
    caches = [(batch.cache, apart_cache, batch.attention_mask)]
    caches += [(ours.cache, expected.cache, expected.attention_mask) for ours, expected in started]
    reuses = int(model.prompt_passes.caches_causal_prefix)
    return (
        prefixes.hits == reuses
        and close(logits, apart[0])
        and all(close(ours.logits, expected.logits) for ours, expected in started)
        and all(
            close(mine.keys, theirs.keys, real) and close(mine.values, theirs.values, real)
            for ours, expected, real in caches
            for mine, theirs in zip(ours.layers, expected.layers, strict=True)
        )
    )


def started_apart(model, prompts):
    """What a joined forward gives for newcomers ``prompts``, computed apart: `prefill_tokens`, then
    `decode` of each prompt's last token (a `model.Started`)."""
    prefilled = model.prefill_tokens(prompts)
    logits = model.decode(
        prefilled.cache, prefilled.input_ids[:, -1:], prefilled.attention_mask, prefilled.positions
    )
    return Started(prefilled.cache, prefilled.attention_mask, logits[:, -1])
