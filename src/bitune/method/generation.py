"""Generation from a prefilled prompt cache (paper Algorithm 1).

The prompts are prefilled (for Bitune: both prompt passes and the mix) and then decoded by Hugging Face
``generate`` with the causal adapter, starting from the prompt's last token: decoding is plain causal
decoding, so every ``generate`` feature (GenerationConfig, greedy and sampling, eos, stop strings, streamers,
logits processors) works unchanged. Only the prefill differs (App. 6.4: prefill twice, decode unchanged).
`BituneModel.generate` calls `generate_from_prefill` with its own prefill.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from transformers import Cache, PreTrainedModel

from .batching import left_pad

_UNSUPPORTED = ("past_key_values", "inputs_embeds", "prompt_lookup_num_tokens", "assistant_model")

Prefill = Callable[[torch.Tensor, torch.Tensor], Cache]


def generate_from_prefill(
    base_model: PreTrainedModel,
    prefill: Prefill,
    decoding: Callable[[], AbstractContextManager],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs,
):
    """Left-pad the prompts, prefill their cache and continue with ``base_model.generate``.

    Args:
        base_model: the Hugging Face model (adapters injected) that decodes.
        prefill: left-padded (ids, mask) -> the cache over every prompt token but the last.
        decoding: a context manager factory active while decoding (the causal adapter).
        input_ids: (B, T) prompts, each ending with the template's last token; padded on either side.
        attention_mask: (B, T), 1 for real tokens (None: no padding).
        **generate_kwargs: anything Hugging Face ``generate`` takes, except a cache or embeddings.

    Returns:
        ``generate``'s output for the left-padded prompts (same width T).
    """
    given = sorted(k for k in _UNSUPPORTED if generate_kwargs.get(k) is not None)
    if given:
        raise ValueError(f"BituneModel.generate builds the prompt cache itself and does not take {given}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2D (batch, length), got shape {tuple(input_ids.shape)}")
    input_ids, attention_mask = left_pad(input_ids, attention_mask)
    cache = prefill(input_ids, attention_mask)
    # generate repeats the prompts for beams / several sequences per prompt but not a cache given to it;
    # repeating the cache (not re-prefilling repeated prompts) keeps the prefill cost of one prompt.
    expand = _expand_size(base_model, generate_kwargs)
    if expand > 1:
        cache.batch_repeat_interleave(expand)
    with decoding():
        return base_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **generate_kwargs
        )


def _expand_size(base_model: PreTrainedModel, generate_kwargs: dict) -> int:
    """The factor by which ``generate`` will repeat each prompt (as transformers computes it)."""
    config = generate_kwargs.get("generation_config") or base_model.generation_config
    beams = generate_kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    sequences = (
        generate_kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    )
    return max(beams, sequences)
