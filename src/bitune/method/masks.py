"""Attention masks of the prompt passes, expressed through public transformers arguments only.

- ``causal``: the model's own causal mask from the 2D padding mask.
- ``bidirectional``: ``is_causal=False`` for that call (transformers 5), which makes the model build a
  padding-aware bidirectional mask on eager, sdpa and flex attention; sliding-window layers get a
  symmetric window.
- ``anti_causal``: the transpose of the causal mask (a token sees itself and the tokens after it,
  paper Table 5b). transformers has no switch for it, so it is passed as an explicit *additive* float
  4D mask (a boolean 4D mask is silently wrong on eager attention). Models with several attention layer
  types (Gemma 2/3: full and sliding) get one mask per type.

`explicit_mask` builds such a mask with a different kind per row, which lets the two prompt passes of
Bitune run as one forward over a doubled batch.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

FULL, SLIDING = "full_attention", "sliding_attention"
ATTENTION_LAYER_TYPES = {FULL, SLIDING, "chunked_attention"}  # layer types that cache keys and values


def prompt_pass_kwargs(
    kind: str, attention_mask: torch.Tensor, config: PretrainedConfig, dtype: torch.dtype
) -> dict[str, Any]:
    """Keyword arguments for a decoder call that reads the prompt under mask ``kind``.

    Args:
        kind: ``causal``, ``bidirectional`` or ``anti_causal``.
        attention_mask: (B, T) padding mask of the prompt, 1 for real tokens.
        config: the decoder's config (layer types, sliding window, attention implementation).
        dtype: dtype of the attention scores (the model's dtype), for the additive mask.

    Returns:
        ``attention_mask`` plus ``is_causal`` where needed.
    """
    if kind == "causal":
        return {"attention_mask": attention_mask}
    if kind == "bidirectional":
        return {"attention_mask": attention_mask, "is_causal": False}
    if kind == "anti_causal":
        return {"attention_mask": anti_causal_mask(attention_mask, config, dtype)}
    raise ValueError(f"unknown prompt mask {kind!r}; expected causal, bidirectional or anti_causal")


def layer_attention_types(config: PretrainedConfig) -> list[str]:
    """The attention type of each layer: the config's ``layer_types`` or, without them, all sliding when
    the config sets a sliding window (Mistral-style) and all full otherwise."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * config.num_hidden_layers


def anti_causal_mask(
    attention_mask: torch.Tensor, config: PretrainedConfig, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive (B, 1, T, T) mask where query i may attend key j iff j >= i, key j is not padding and, on
    sliding-window layers, j - i < window (the transpose of transformers' causal sliding window)."""
    return explicit_mask(["anti_causal"] * attention_mask.shape[0], attention_mask, config, dtype)


def explicit_mask(
    kinds: list[str], attention_mask: torch.Tensor, config: PretrainedConfig, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive (N, 1, T, T) mask giving row n the mask ``kinds[n]`` (causal, bidirectional, anti_causal),
    as transformers would build it for that row alone: keys that are padding are masked; on
    sliding-window layers causal keeps q - k < window, anti-causal k - q < window and bidirectional
    |q - k| <= window (transformers' definitions). One mask per layer type when the model has several.
    """
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if "flash" in implementation:
        raise ValueError(
            f"{sorted(set(kinds))} prompt masks need an explicit 4D mask, which {implementation} cannot take; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    types = set(layer_attention_types(config))
    unsupported = types - {FULL, SLIDING}
    if unsupported:
        raise ValueError(
            f"explicit prompt masks support full and sliding-window attention layers; this model also has "
            f"{sorted(unsupported)}"
        )
    length = attention_mask.shape[-1]
    position = torch.arange(length, device=attention_mask.device)
    offset = position[None, :] - position[:, None]  # (T, T): key index - query index
    keys_present = attention_mask.bool()[:, None, None, :]  # (N, 1, 1, T)
    masks = {}
    for layer_type in types:
        window = config.sliding_window if layer_type == SLIDING else None
        allowed = {kind: _allowed(kind, offset, window) for kind in set(kinds)}
        rows = torch.stack([allowed[kind] for kind in kinds])[:, None]  # (N, 1, T, T)
        masks[layer_type] = _additive(rows & keys_present, dtype)
    return masks if len(masks) > 1 else next(iter(masks.values()))


def _allowed(kind: str, offset: torch.Tensor, window: int | None) -> torch.Tensor:
    if kind == "causal":
        allowed = offset <= 0
        return allowed & (-offset < window) if window else allowed
    if kind == "anti_causal":
        allowed = offset >= 0
        return allowed & (offset < window) if window else allowed
    if kind == "bidirectional":
        return offset.abs() <= window if window else torch.ones_like(offset, dtype=torch.bool)
    raise ValueError(f"unknown prompt mask {kind!r}; expected causal, bidirectional or anti_causal")


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
