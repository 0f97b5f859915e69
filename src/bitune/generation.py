"""Generation from the Bitune cache (paper Algorithm 1).

The prompts are prefilled with the variant's prompt passes (twice for Bitune) and then decoded by
Hugging Face ``generate`` with the causal adapter, starting from the prompt's last token: decoding is
plain causal decoding, so every ``generate`` feature (GenerationConfig, greedy and sampling, eos, stop
strings, streamers, logits processors) works unchanged. Only the prefill differs (App. 6.4: prefill
twice, decode unchanged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .batching import left_pad
from .config import CAUSAL_ADAPTER

if TYPE_CHECKING:
    from .model import BituneModel

_UNSUPPORTED = ("past_key_values", "inputs_embeds", "prompt_lookup_num_tokens", "assistant_model")


def generate_from_prompts(
    model: BituneModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
):
    """Left-pad the prompts, prefill the Bitune cache and continue with ``generate``.

    Args:
        model: the Bitune model.
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
    cache = model.prefill(input_ids, attention_mask)
    # generate repeats the prompts for beams / several sequences per prompt but not a cache given to it;
    # repeating the cache (not re-prefilling repeated prompts) keeps the prefill cost of one prompt.
    expand = _expand_size(model, generate_kwargs)
    if expand > 1:
        cache.batch_repeat_interleave(expand)
    with model.adapters.use(CAUSAL_ADAPTER):
        return model.base_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, **generate_kwargs
        )


def _expand_size(model: BituneModel, generate_kwargs: dict) -> int:
    """The factor by which ``generate`` will repeat each prompt (as transformers computes it)."""
    config = generate_kwargs.get("generation_config") or model.base_model.generation_config
    beams = generate_kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    sequences = (
        generate_kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    )
    return max(beams, sequences)
