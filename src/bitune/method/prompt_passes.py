"""The prompt passes: the decoder (no LM head) over the prompt, once per pass, filling the cache to answer from.

A variant is a list of passes (config.py): Bitune has two, a causal one with the causal adapter and a
bidirectional one with the bidirectional adapter, whose caches are mixed per layer (mixing.py). The two
passes run one after the other, or as one forward over the batch stacked twice, each row with its own mask
kind (masks.py) and adapter (adapters.py); both give the same cache. Whether they stack is decided once,
when a `PromptPasses` is made, from its `PromptPassOptions` and what the probes found (probes.py):
``stack="always"`` either works or raises there, for masks and adapters alike. A model merged for inference
(merging.py) routes only its bidirectional adapter per row, and ``stack="auto"`` stacks its small prefills
there: up to `SMALL_PREFILL_TOKENS` prompt tokens in all, where one forward's fixed cost outweighs the
second copy's work (on 2 CPU cores, SmolLM2-135M, 40-token prompts: 139 against 173 ms for one prompt, even
at four, 1.28x slower at sixteen).

With ``recompute`` each forward is checkpointed as a whole (torch's non-reentrant activation checkpointing):
only its cache is kept, and backward recomputes the pass's activations just before it needs them. Hugging
Face's per-layer checkpointing cannot be used instead: it drops the cache.

A prompt pass's last hidden states are not used, so its last layer would get its gradient only through the
cache, behind the back of anything that hooks a module's outputs to prepare its backward (FSDP2 gathers a
sharded layer's weights when the gradient reaches the layer's output, and without that reads freed
storage). With ``outputs`` given, each pass's last hidden states are appended to it, for the loss to keep
in the graph with weight zero (`anchored`), which changes no value and no gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .adapters import AdapterSwitch
from .config import CAUSAL_ADAPTER, PromptPass, PromptPassOptions
from .masks import explicit_mask, prompt_pass_kwargs
from .mixing import KVMixing
from .probes import BaseModelSupport

SMALL_PREFILL_TOKENS = 128  # a merged model stacks prefills of at most this many prompt tokens (see above)


class PromptPasses:
    """Runs a variant's prompt passes through ``decoder`` and returns the (mixed) cache to answer from.

    Args:
        decoder: the base model's decoder (``get_decoder()``: no LM head), with the adapters injected.
        passes: the variant's prompt passes; with mixing, the first is the causal side.
        adapters: switches the adapter of each pass.
        mixing: mixes two passes' caches (None for one-pass variants).
        support: what the probes found about the base model.
        options: stacking and recomputation.

    Raises:
        ValueError: if ``options.stack`` is ``always`` and the masks or adapters cannot be stacked.
    """

    def __init__(
        self,
        decoder: nn.Module,
        passes: tuple[PromptPass, ...],
        adapters: AdapterSwitch,
        mixing: KVMixing | None,
        support: BaseModelSupport,
        options: PromptPassOptions,
    ) -> None:
        if len(passes) == 2 and mixing is None:
            raise ValueError("two prompt passes need a KVMixing to mix their caches")
        self.decoder = decoder
        self.passes = passes
        self.adapters = adapters
        self.mixing = mixing
        self.support = support
        self.options = options
        self.stacked, self.stacks_small = self._decide_stacking()

    def _decide_stacking(self) -> tuple[bool, bool]:
        """Whether the passes always stack, and whether they stack small prefills (a merged model)."""
        if len(self.passes) < 2 or self.options.stack == "never":
            return False, False
        first, second = self.passes
        shared = first.adapter == second.adapter
        problems = []
        if first.mask != second.mask and self.support.stacking_problem:
            problems.append(f"the model cannot take a per-row 4D mask ({self.support.stacking_problem})")
        if not shared and not self.adapters.can_route_rows:
            problems.append("its adapters cannot be routed per row (only plain LoRA can; not DoRA or IA3)")
        if self.options.stack == "always":
            if problems:
                raise ValueError(
                    "stack_prompt_passes='always' cannot stack the two prompt passes: "
                    + "; ".join(problems)
                    + "; use 'auto' or 'never'"
                )
            return True, True
        if problems:
            return False, False
        return shared, self.adapters.merged

    def __call__(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        positions: torch.Tensor,
        outputs: list[torch.Tensor] | None = None,
    ) -> DynamicCache:
        """The cache of the prompts after every pass (and the mix).

        Args:
            prompt_ids: (B, Tp) prompt tokens without the template's last token.
            prompt_mask: (B, Tp) 1 for real tokens.
            positions: (B, Tp) position ids.
            outputs: receives each forward's last hidden states (see the module's docstring).
        """
        if not prompt_ids.shape[1]:
            return DynamicCache(config=self.decoder.config)
        outputs = [] if outputs is None else outputs
        if len(self.passes) == 1:
            return self._run(prompt_ids, prompt_mask, positions, [self.passes[0]], outputs)
        if self.stacked or (self.stacks_small and prompt_ids.numel() <= SMALL_PREFILL_TOKENS):
            rows = [self.passes[0]] * len(prompt_ids) + [self.passes[1]] * len(prompt_ids)
            stacked = self._run(
                torch.cat([prompt_ids, prompt_ids]),
                torch.cat([prompt_mask, prompt_mask]),
                torch.cat([positions, positions]),
                rows,
                outputs,
            )
            return self.mixing.mix_stacked(stacked, len(prompt_ids))
        causal, second = (self._run(prompt_ids, prompt_mask, positions, [p], outputs) for p in self.passes)
        return self.mixing(causal, second)

    def can_join(self, tokens: int) -> bool:
        """Whether new prompts of ``tokens`` prompt tokens in all (without each one's last) can be prefilled
        inside a decoding step (joining.py): a merged model's small prefill (both passes stacked, or its
        one pass), when there is something to prefill."""
        joins = self.stacks_small if len(self.passes) == 2 else self.adapters.merged
        return joins and 0 < tokens <= SMALL_PREFILL_TOKENS

    @property
    def caches_causal_prefix(self) -> bool:
        """Whether the first pass is the causal adapter's causal read, whose keys and values over a prompt's
        prefix depend on that prefix alone (`prefixes.py`): its rows are the first of `stacked_rows`."""
        return self.passes[0] == PromptPass(CAUSAL_ADAPTER, "causal")

    def stacked_rows(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | dict[str, torch.Tensor], list[str]]:
        """Every pass's rows stacked as `__call__` stacks two passes: (passes * B, Tp) ids and positions,
        each row's 4D attention mask (`explicit_mask`) and its adapter (`row_mixer` turns their cache into
        the one to answer from)."""
        rows = [p for p in self.passes for _ in range(len(prompt_ids))]
        copies = len(self.passes)
        mask = explicit_mask(
            [p.mask for p in rows], prompt_mask.repeat(copies, 1), self.decoder.config, self.decoder.dtype
        )
        return prompt_ids.repeat(copies, 1), positions.repeat(copies, 1), mask, [p.adapter for p in rows]

    def row_mixer(
        self, batch_size: int
    ) -> Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """``(layer, keys, values) -> (keys, values)``: one layer of `stacked_rows`' cache turned into the
        cache to answer from (mixed if there are two passes), for a forward that answers from it layer by
        layer (joining.py)."""
        if len(self.passes) == 1:
            return lambda layer, keys, values: (keys, values)
        ratios = self.mixing.ratios()
        return lambda layer, keys, values: self.mixing.mix_rows(keys, values, batch_size, layer, ratios)

    def _run(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        rows: list[PromptPass],
        outputs: list[torch.Tensor],
    ) -> DynamicCache:
        """One decoder forward filling a cache; ``rows`` is one pass for all rows, or one pass per row.
        Checkpointed (recomputed in backward) with ``options.recompute`` when gradients are on."""
        if self.options.recompute and torch.is_grad_enabled():
            cache, hidden = checkpoint(self._forward, ids, mask, positions, rows, use_reentrant=False)
        else:
            cache, hidden = self._forward(ids, mask, positions, rows)
        outputs.append(hidden)
        return cache

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, rows: list[PromptPass]
    ) -> tuple[DynamicCache, torch.Tensor]:
        config, dtype = self.decoder.config, self.decoder.dtype
        cache = DynamicCache(config=config)
        kinds = [p.mask for p in rows]
        if len(set(kinds)) == 1 and kinds[0] not in self.support.explicit_masks:
            mask_kwargs = prompt_pass_kwargs(kinds[0], mask, config, dtype)
        else:
            mask_kwargs = {"attention_mask": explicit_mask(kinds, mask, config, dtype)}
        adapters = [p.adapter for p in rows]
        routing = (
            self.adapters.use(adapters[0]) if len(set(adapters)) == 1 else self.adapters.per_row(adapters)
        )
        decoder = (
            self.adapters.decoder(adapters[0], self.decoder) if len(set(adapters)) == 1 else self.decoder
        )
        with routing:
            hidden = decoder(
                input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, **mask_kwargs
            ).last_hidden_state
        if cache.get_seq_length() != ids.shape[1]:
            raise RuntimeError(
                f"a prompt pass left a cache of {cache.get_seq_length()} tokens for {ids.shape[1]}: the model "
                "dropped its KV cache (gradient checkpointing?)"
            )
        return cache, hidden


def anchored(loss: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """``loss`` with the prompt passes' ``outputs`` in its graph at weight zero (same value, same gradients)."""
    for hidden in outputs:
        loss = loss + hidden.sum() * 0.0
    return loss
