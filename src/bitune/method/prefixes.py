"""Prefix caching of the causal prompt pass: the keys and values of a shared prompt prefix (a system prompt),
computed once and reused by the prompts that begin with it.

Only the causal pass with the causal adapter is cached, and only for a model merged for inference (where
that pass is the plain model with the causal adapter in its weights): there a token's keys and values depend
on the tokens up to it alone and on its position, which starts at 0 in every prompt, so every prompt that
begins with the same tokens has the same ones. The bidirectional pass is never cached: each of its tokens
reads the whole prompt.

A joined forward (`joining.py`) reads the store: the newcomers' causal rows then compute only their last
columns, and attend over the cached keys and values of the columns before (`CausalPrefixes.match`). After
the forward every newcomer's causal keys and values are stored (`CausalPrefixes.add`), least recently used
first out beyond ``max_tokens``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batching import pad_columns_left

MIN_PREFIX_TOKENS = 8  # a shorter match is not worth a longer forward's bookkeeping


@dataclass
class CachedPrefix:
    """One prompt's causal keys and values, per layer (heads, tokens, dim), over its ``tokens``."""

    tokens: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class PrefixMatch:
    """The leading ``width`` columns of a batch of left-padded causal rows, taken from ``prefix``: row i's
    columns ``[starts[i], width)`` are the first ``width - starts[i]`` tokens of ``prefix`` (the columns
    before it are padding)."""

    prefix: CachedPrefix
    width: int
    starts: list[int]

    def leading(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' (rows, heads, width, dim) keys and values of layer ``layer`` (zeros over padding)."""
        return tuple(  # type: ignore[return-value]
            torch.stack(
                [
                    pad_columns_left(t[layer][:, : max(0, self.width - start)], self.width)
                    for start in self.starts
                ]
            )
            for t in (self.prefix.keys, self.prefix.values)
        )


class CausalPrefixes:
    """The store (see the module docstring); holds at most ``max_tokens`` tokens' keys and values."""

    def __init__(self, max_tokens: int = 2048) -> None:
        if max_tokens < 0:
            raise ValueError(f"the prefix cache's max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self.prefixes: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()
        self.tokens = 0
        self.hits = 0  # joined forwards that reused a prefix, and the causal-row tokens they did not compute
        self.tokens_reused = 0

    def match(self, prompts: Sequence[Sequence[int]], width: int) -> PrefixMatch | None:
        """The best cached prefix for ``prompts``' causal rows, left-padded to ``width`` columns (every
        prompt's tokens but its last): the one that covers the most leading columns of every row, leaving at
        least the last column to compute; None below `MIN_PREFIX_TOKENS` columns."""
        starts = [width - (len(p) - 1) for p in prompts]
        best: PrefixMatch | None = None
        for prefix in self.prefixes.values():
            covered = min(
                [width - 1]
                + [start + _common_length(p, prefix.tokens) for start, p in zip(starts, prompts, strict=True)]
            )
            if covered >= MIN_PREFIX_TOKENS and (best is None or covered > best.width):
                best = PrefixMatch(prefix, covered, starts)
        if best is not None:
            self.prefixes.move_to_end(best.prefix.tokens)
            self.hits += 1
            self.tokens_reused += best.width * len(prompts) - sum(min(s, best.width) for s in starts)
        return best

    def add(
        self, prompts: Sequence[Sequence[int]], layers: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        """Store each prompt's causal keys and values: ``layers`` holds each layer's (rows, heads, width,
        dim) keys and values, row i that of ``prompts[i]`` left-padded (its tokens but its last)."""
        for i, prompt in enumerate(prompts):
            tokens = tuple(prompt[:-1])
            if not tokens or tokens in self.prefixes or len(tokens) > self.max_tokens:
                continue
            start = layers[0][0].shape[2] - len(tokens)
            self.prefixes[tokens] = CachedPrefix(
                tokens,
                [keys[i, :, start:].clone() for keys, _ in layers],
                [values[i, :, start:].clone() for _, values in layers],
            )
            self.tokens += len(tokens)
            while self.tokens > self.max_tokens:
                _, dropped = self.prefixes.popitem(last=False)
                self.tokens -= len(dropped.tokens)


def _common_length(prompt: Sequence[int], tokens: tuple[int, ...]) -> int:
    """How many leading prompt-pass tokens of ``prompt`` (all but its last) equal ``tokens``'."""
    count = 0
    for a, b in zip(prompt[:-1], tokens, strict=False):
        if a != b:
            break
        count += 1
    return count
