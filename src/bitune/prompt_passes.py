"""The prompt passes: the decoder (no LM head) over the prompt, once per pass, filling the cache to answer from.

A variant is a list of passes (config.py): Bitune has two, a causal one with the causal adapter and a
bidirectional one with the bidirectional adapter, whose caches are mixed per layer (mixing.py). The two
passes run one after the other, or as one forward over the batch stacked twice, each row with its own mask
kind (masks.py) and adapter (adapters.py); both give the same cache.

With ``model.checkpoint_prompt_passes`` each forward is checkpointed as a whole (torch's non-reentrant
activation checkpointing): only its cache is kept, and backward recomputes the pass's activations just
before it needs them. Hugging Face's per-layer checkpointing cannot be used instead: it drops the cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .config import PromptPass
from .masks import explicit_mask, prompt_pass_kwargs

if TYPE_CHECKING:
    from .model import BituneModel


def prompt_cache(
    model: BituneModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor
) -> DynamicCache:
    """Run the variant's prompt passes and return the (mixed) cache to answer from.

    Args:
        model: the Bitune model; its ``stack_prompt_passes`` says whether two passes share one forward.
        prompt_ids: (B, Tp) prompt tokens without the template's last token.
        prompt_mask: (B, Tp) 1 for real tokens.
        positions: (B, Tp) position ids.
    """
    passes = model.bitune_config.prompt_passes
    if not prompt_ids.shape[1]:
        return DynamicCache(config=model.base_model.get_decoder().config)
    if len(passes) == 1:
        return run_prompt_pass(model, prompt_ids, prompt_mask, positions, [passes[0]])
    shared = passes[0].adapter == passes[1].adapter
    stack = model.stack_prompt_passes
    if passes[0].mask != passes[1].mask and model.stacking_mask_problem:
        if stack is True:
            raise ValueError(
                "stack_prompt_passes=True needs an explicit per-row 4D mask, which this model cannot take "
                f"({model.stacking_mask_problem}); set model.stack_prompt_passes = False"
            )
        stack = False
    if (stack == "auto" and shared) or (stack is True and (shared or model.adapters.can_route_rows)):
        stacked = run_prompt_pass(
            model,
            torch.cat([prompt_ids, prompt_ids]),
            torch.cat([prompt_mask, prompt_mask]),
            torch.cat([positions, positions]),
            [passes[0]] * len(prompt_ids) + [passes[1]] * len(prompt_ids),
        )
        return model.mixing.mix_stacked(stacked, len(prompt_ids))
    caches = [run_prompt_pass(model, prompt_ids, prompt_mask, positions, [p]) for p in passes]
    return model.mixing(caches[0], caches[1])


def run_prompt_pass(
    model: BituneModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, rows: list[PromptPass]
) -> DynamicCache:
    """One decoder forward filling a cache; ``rows`` is one pass for all rows, or one pass per row.
    Checkpointed (recomputed in backward) when ``model.checkpoint_prompt_passes`` and gradients are on.

    Raises:
        RuntimeError: if the model dropped its cache (the answer pass would silently lose the prompt).
    """
    if model.checkpoint_prompt_passes and torch.is_grad_enabled():
        return checkpoint(_prompt_pass, model, ids, mask, positions, rows, use_reentrant=False)
    return _prompt_pass(model, ids, mask, positions, rows)


def _prompt_pass(
    model: BituneModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, rows: list[PromptPass]
) -> DynamicCache:
    base = model.base_model
    decoder = base.get_decoder()
    cache = DynamicCache(config=decoder.config)
    if len({p.mask for p in rows}) == 1 and rows[0].mask not in model.explicit_masks_for:
        kwargs = prompt_pass_kwargs(rows[0].mask, mask, decoder.config, base.dtype)
    else:
        kwargs = {"attention_mask": explicit_mask([p.mask for p in rows], mask, decoder.config, base.dtype)}
    adapters = [p.adapter for p in rows]
    routing = model.adapters.use(adapters[0]) if len(set(adapters)) == 1 else model.adapters.per_row(adapters)
    with routing:
        decoder(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, **kwargs)
    if cache.get_seq_length() != ids.shape[1]:
        raise RuntimeError(
            f"a prompt pass left a cache of {cache.get_seq_length()} tokens for {ids.shape[1]}: the model "
            "dropped its KV cache (gradient checkpointing?)"
        )
    return cache
