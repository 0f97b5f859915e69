"""BituneModel: prompt passes -> (mixed) KV cache -> causal answer pass, on any Hugging Face decoder.

Training step (paper Algorithm 2), for a batch of prompt + answer rows:

    K_c, V_c = decoder_causal(prompt[:-1])                # causal adapter, causal mask, no LM head
    K_b, V_b = decoder_bidir(prompt[:-1])                 # bidir adapter, bidirectional mask
    cache    = mix(K_c, K_b, alpha_k), mix(V_c, V_b, alpha_v)    # per layer, fp32 (mixing.py)
    logits   = causal_lm([prompt[-1]] + answer, cache)    # causal adapter
    loss     = cross_entropy(logits, answer + EOS)        # answer tokens only

Every variant of the paper is a different list of prompt passes (config.py, run by prompt_passes.py); the answer
pass is shared.
Nothing of the model is copied or patched: passes go through the model's public arguments (``is_causal``,
``attention_mask``, ``position_ids``, ``past_key_values``), so one code path serves every decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import Cache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .adapters import (
    AdapterSwitch,
    adapter_parameters,
    create_peft_model,
    modules_without_kv_influence,
    with_excluded_modules,
)
from .batching import (
    is_left_padded,
    prompt_lengths_from_labels,
    real_token_spans,
    split_prompt_answer,
)
from .config import BIDIR_ADAPTER, CAUSAL_ADAPTER, BituneConfig
from .generation import generate_from_prompts
from .loss import answer_loss, linear_cross_entropy, plain_lm_head
from .masks import STACKED, prompt_mask_problems
from .mixing import KVMixing
from .prompt_passes import prompt_cache

_NO_CHECKPOINTING = (
    "Bitune does not support Hugging Face's gradient checkpointing: its checkpointed layers drop the KV caches "
    "that carry the prompt passes into the answer pass. Turn it off; to save memory, recompute the prompt "
    "passes in backward instead (model.checkpoint_prompt_passes = True, or training.checkpoint_prompt_passes "
    "in a run config), or use a smaller micro-batch with gradient accumulation."
)


@dataclass
class BituneCausalLMOutput(CausalLMOutput):
    """``logits[i, j]`` scores the token after answer-pass position j of row i, i.e. the token at
    ``prompt_lengths[i] + j`` of the row's real tokens; ``answer_mask`` marks real answer-pass positions.
    Prompt positions have no logits: the prompt passes never run the LM head. ``logits`` is None when the
    loss was computed without them (``skip_logits``)."""

    answer_mask: torch.Tensor | None = None


class BituneModel(nn.Module):
    """A decoder-only language model tuned with Bitune. Build it with `get_bitune_model`."""

    # forward takes num_items_in_batch, so the HF Trainer normalises the loss over all accumulated tokens
    accepts_loss_kwargs = True

    def __init__(
        self,
        peft_model: PeftModel,
        config: BituneConfig,
        mixing: KVMixing | None,
        num_cache_layers: int,
        head_is_plain: bool = False,
    ) -> None:
        super().__init__()
        self.peft_model = peft_model
        self.adapters = AdapterSwitch(peft_model)
        self.mixing = mixing
        self.bitune_config = config
        self.num_cache_layers = num_cache_layers
        # Whether the logits are the output embedding of the decoder's last hidden state (loss.plain_lm_head):
        # then training never materialises them (loss.linear_cross_entropy).
        self.head_is_plain = head_is_plain
        # Two prompt passes as one forward over a doubled batch (same result): "auto" does it when both
        # passes use one adapter (measured faster on CPU), True also routes two adapters per row (measured
        # slower on CPU: benchmarks/RESULTS.md), False never.
        self.stack_prompt_passes: bool | str = "auto"
        # Keep only the prompt caches from forward and recompute the prompt passes' activations in backward:
        # less memory (the prompt passes' activations are most of Bitune's extra) for one more forward of
        # the prompt passes. Same loss and gradients.
        self.checkpoint_prompt_passes: bool = False
        # Why this base model cannot take the explicit per-row mask of stacked passes (None: it can).
        self.stacking_mask_problem: str | None = None
        # Masks this base model drops as keyword arguments and gets as explicit 4D masks instead.
        self.explicit_masks_for: set[str] = set()

    # ----------------------------------------------------------------------------------------- access
    @property
    def base_model(self) -> PreTrainedModel:
        """The Hugging Face model, with the adapters' layers injected."""
        return self.peft_model.get_base_model()

    @property
    def config(self):
        """The base model's config (what Hugging Face tooling expects under ``model.config``)."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def adapter_configs(self) -> dict[str, PeftConfig]:
        """PEFT config of each adapter, as injected (the bidir one with its excluded modules)."""
        return {name: self.peft_model.peft_config[name] for name in self.bitune_config.adapter_names}

    def mixing_ratios(self) -> dict[str, list[float]]:
        """Per-layer bidirectional-to-causal ratio alpha for keys and values (empty without mixing)."""
        if self.mixing is None:
            return {"k": [], "v": []}
        alpha_k, alpha_v = self.mixing.ratios()
        return {"k": alpha_k.detach().cpu().tolist(), "v": alpha_v.detach().cpu().tolist()}

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per adapter and for the mixing coefficients."""
        counts = {
            f"adapter {name}": sum(
                p.numel() for p in adapter_parameters(self.peft_model, [name]).values() if p.requires_grad
            )
            for name in self.bitune_config.adapter_names
        }
        if self.mixing is not None:
            counts["mixing"] = sum(p.numel() for p in self.mixing.parameters() if p.requires_grad)
        return counts

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts, like PEFT, with the per-adapter breakdown."""
        counts = self.trainable_parameter_counts()
        trainable = sum(counts.values())
        total = sum(p.numel() for p in self.parameters())
        parts = ", ".join(f"{k}: {v:,}" for k, v in counts.items())
        print(
            f"trainable params: {trainable:,} ({parts}) || all params: {total:,} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------------------------ the method
    def _check_trainable_setup(self) -> None:
        if self.training and any(
            getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules()
        ):
            raise ValueError(_NO_CHECKPOINTING)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        skip_logits: bool | None = None,
        **kwargs,
    ) -> BituneCausalLMOutput:
        """Score the answers of a batch of prompt + answer rows.

        Args:
            input_ids: (B, T) rows of prompt then answer tokens, padded on either side.
            attention_mask: (B, T) 1 for real tokens.
            labels: (B, T) aligned with ``input_ids``, IGNORE_INDEX (-100) on the prompt and padding.
            prompt_lengths: (B,) prompt tokens per row including the template's last token; derived from
                ``labels`` (the leading -100 run) when absent.
            num_items_in_batch: number of supervised tokens over all accumulated micro-batches (passed by
                the HF Trainer); the loss is then a sum divided by it, as transformers does.
            skip_logits: compute the loss without materialising the logits (returned as None): the LM head
                runs in chunks over the supervised tokens only. Default: when training with labels and
                gradients enabled. Models whose logits are more than a linear head (e.g. soft-capped) compute
                the loss from full logits either way.

        Returns:
            A ``CausalLMOutput`` with ``loss`` over answer tokens only and the answer-pass ``logits``
            (B, Ta, V); see `BituneCausalLMOutput`.
        """
        self._check_trainable_setup()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_lengths is None:
            if labels is None:
                raise ValueError(
                    "BituneModel.forward needs prompt_lengths or labels to find the prompt boundary"
                )
            prompt_lengths = prompt_lengths_from_labels(labels, attention_mask)
        if skip_logits is None:
            skip_logits = self.training and labels is not None and torch.is_grad_enabled()
        batch = split_prompt_answer(input_ids, attention_mask, prompt_lengths, labels)
        cache = prompt_cache(self, batch.prompt_ids, batch.prompt_mask, batch.prompt_positions)
        answer = (batch.answer_ids, batch.answer_mask, batch.answer_positions, cache, batch.prompt_mask)
        head = self._fusable_head()
        if skip_logits and batch.targets is not None and head is not None:
            loss = linear_cross_entropy(self.answer_hidden(*answer), head, batch.targets, num_items_in_batch)
            return BituneCausalLMOutput(loss=loss, logits=None, answer_mask=batch.answer_mask)
        logits = self.answer_logits(*answer)
        loss = None
        if batch.targets is not None:
            loss = answer_loss(logits, batch.targets, num_items_in_batch)
        return BituneCausalLMOutput(
            loss=loss, logits=None if skip_logits else logits, answer_mask=batch.answer_mask
        )

    def _fusable_head(self) -> nn.Linear | None:
        """The LM head if the loss may bypass the logits: plain (probed at build), still a frozen
        ``nn.Linear`` (not wrapped by an adapter)."""
        head = self.base_model.get_output_embeddings()
        if not self.head_is_plain or type(head) is not nn.Linear:
            return None
        if any(p.requires_grad for p in head.parameters()):
            return None
        return head

    def answer_logits(
        self,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_positions: torch.Tensor,
        cache: Cache,
        prompt_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The causal answer pass on top of a prompt cache: (B, Ta, V) logits.

        Args:
            answer_ids: (B, Ta) right-padded answer-pass tokens (the prompt's last token first).
            answer_mask: (B, Ta) 1 for real tokens.
            answer_positions: (B, Ta) position ids (the prompt's real length - 1 + column).
            cache: the prompt cache (consumed: it grows by the answer's K/V).
            prompt_mask: (B, Tp) padding mask of the cached prompt columns.
        """
        with self.adapters.use(CAUSAL_ADAPTER):
            return self.base_model(
                **_answer_inputs(answer_ids, answer_mask, answer_positions, cache, prompt_mask)
            ).logits

    def answer_hidden(
        self,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_positions: torch.Tensor,
        cache: Cache,
        prompt_mask: torch.Tensor,
    ) -> torch.Tensor:
        """`answer_logits` without the LM head: the decoder's last hidden states (B, Ta, H)."""
        decoder = self.base_model.get_decoder()
        with self.adapters.use(CAUSAL_ADAPTER):
            inputs = _answer_inputs(answer_ids, answer_mask, answer_positions, cache, prompt_mask)
            return decoder(**inputs).last_hidden_state

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Cache:
        """The mixed KV cache of a batch of prompts, ready for decoding.

        Args:
            input_ids: (B, T) left-padded prompts, each ending with the template's last token.
            attention_mask: (B, T), 1 for real tokens.

        Returns:
            A cache over the first T - 1 columns: every prompt token except the last, which is the first
            token to decode from it (``generate`` does exactly this).

        Raises:
            ValueError: if a row does not end in the last column (use `bitune.left_pad`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real_token_spans(attention_mask)
        if not is_left_padded(attention_mask):
            raise ValueError(
                "prefill needs left-padded prompts (every row's last token in the last column) so the cache "
                "lines up with input_ids for decoding; pad with bitune.left_pad(input_ids, attention_mask)"
            )
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return prompt_cache(self, input_ids[:, :-1], attention_mask[:, :-1].long(), positions[:, :-1])

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ):
        """Hugging Face ``generate`` decoding causally from the Bitune cache of the prompts.

        Accepts left- or right-padded prompts; returns what ``generate`` returns for the same prompts
        left-padded (same width), so ``output[:, input_ids.shape[1]:]`` are the new tokens.
        """
        return generate_from_prompts(self, input_ids, attention_mask, **generate_kwargs)

    # --------------------------------------------------------------------------------------- training
    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """Refused: see `_NO_CHECKPOINTING` (the prompt caches would vanish)."""
        raise ValueError(_NO_CHECKPOINTING)

    gradient_checkpointing_enable = activation_checkpointing_enable

    @property
    def is_activation_checkpointing(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Save adapters (PEFT format, one folder each), mixing coefficients and config as safetensors + JSON."""
        from .saving import save_bitune

        save_bitune(self, save_directory)

    @classmethod
    def from_pretrained(
        cls, base_model: PreTrainedModel, directory: str | Path, is_trainable: bool = False
    ) -> BituneModel:
        """Load a saved Bitune model onto ``base_model``; a base of another architecture or size is refused."""
        from .saving import load_bitune

        return load_bitune(base_model, directory, is_trainable=is_trainable)


def _answer_inputs(answer_ids, answer_mask, answer_positions, cache, prompt_mask) -> dict:
    return dict(
        input_ids=answer_ids,
        attention_mask=torch.cat([prompt_mask, answer_mask], dim=1),
        position_ids=answer_positions,
        past_key_values=cache,
        use_cache=True,
    )


def get_bitune_model(model: PreTrainedModel, config: BituneConfig | None = None) -> BituneModel:
    """Wrap a Hugging Face decoder-only model for Bitune, like ``peft.get_peft_model``.

    The base weights are frozen; the variant's adapters and (if it mixes) its mixing coefficients train.

    Raises:
        ValueError: for a model that is already a PeftModel, uses gradient checkpointing, or keeps no cache.
    """
    config = config or BituneConfig()
    return build_bitune_model(model, config, adapter_configs=None)


def build_bitune_model(
    model: PreTrainedModel, config: BituneConfig, adapter_configs: dict[str, PeftConfig] | None
) -> BituneModel:
    """`get_bitune_model` with the adapters' PEFT configs given explicitly (as saved) or derived."""
    if isinstance(model, PeftModel):
        raise ValueError("get_bitune_model expects a plain transformers model, got a PeftModel")
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"get_bitune_model expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise ValueError(_NO_CHECKPOINTING)
    unreachable, num_cache_layers = modules_without_kv_influence(model)
    mask_problems = prompt_mask_problems(model, [p.mask for p in config.prompt_passes])
    explicit_masks_for = set()
    for kind, problem in mask_problems.items():
        if kind == "bidirectional" and STACKED not in mask_problems:
            explicit_masks_for.add(kind)  # is_causal=False is dropped, but an explicit 4D mask works
        elif kind != STACKED:
            raise ValueError(
                f"{type(model).__name__} cannot run the {kind} prompt pass of variant {config.variant!r}: "
                f"{problem}. Its attention does not take transformers' is_causal=False / 4D masks; "
                "only a causal variant ('lora', 'only_causal') can run on it"
            )
    head_is_plain = plain_lm_head(model)
    if adapter_configs is None:
        adapter_configs = {CAUSAL_ADAPTER: config.peft_config}
        if BIDIR_ADAPTER in config.adapter_names:
            adapter_configs[BIDIR_ADAPTER] = with_excluded_modules(config.peft_config, unreachable)
    peft_model = create_peft_model(model, adapter_configs)
    mixing = None
    if config.uses_mixing:
        mixing = KVMixing(num_cache_layers, config.theta_init, config.alpha_init, device=model.device)
    bitune_model = BituneModel(peft_model, config, mixing, num_cache_layers, head_is_plain)
    bitune_model.stacking_mask_problem = mask_problems.get(STACKED)
    bitune_model.explicit_masks_for = explicit_masks_for
    return bitune_model
