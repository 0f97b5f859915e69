"""BituneModel: prompt passes -> (mixed) KV cache -> causal answer pass, on any Hugging Face decoder.

Training step (paper Algorithm 2), for a batch of prompt + answer rows:

    K_c, V_c = decoder_causal(prompt[:-1])                # causal adapter, causal mask, no LM head
    K_b, V_b = decoder_bidir(prompt[:-1])                 # bidir adapter, bidirectional mask
    cache    = mix(K_c, K_b, alpha_k), mix(V_c, V_b, alpha_v)    # per layer, fp32 (mixing.py)
    logits   = causal_lm([prompt[-1]] + answer, cache)    # causal adapter
    loss     = cross_entropy(logits, answer + EOS)        # answer tokens only

`BituneModel.forward` reads as exactly that: split (batching.py) -> prompt passes (prompt_passes.py; every
variant of the paper is a different list of passes, config.py) -> answer pass -> loss (loss.py). What the
base model supports is probed once when the model is built (probes.py). Nothing of the model is copied or
patched: passes go through its public arguments (``is_causal``, ``attention_mask``, ``position_ids``,
``past_key_values``), so one code path serves every decoder.

Contents: `BituneModel`, whose public API is Hugging Face's (``forward``, ``generate``, ``save_pretrained`` /
``from_pretrained``, parameter counts) plus the calls an inference engine needs (``prefill``,
``prefill_tokens``, ``decode``); and the builders `get_bitune_model` / `build_bitune_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .adapters import (
    AdapterSwitch,
    adapter_parameters,
    adapter_state_dict,
    create_peft_model,
    load_adapter_state_dict,
    with_excluded_modules,
)
from .batching import (
    AnswerPass,
    is_left_padded,
    left_padded,
    padded_positions,
    prompt_lengths_from_labels,
    real_token_spans,
    split_prompt_answer,
)
from .config import BIDIR_ADAPTER, CAUSAL_ADAPTER, BituneConfig
from .generation import generate_from_prefill
from .joining import JoinedCache, RowGroup, Started, joining_agrees, running_joined
from .loss import answer_loss, linear_cross_entropy
from .merging import merge_for_inference, merge_problem, without_tuners
from .mixing import KVMixing
from .prefixes import CausalPrefixes
from .probes import NO_CHECKPOINTING, BaseModelSupport, probe_base_model, uses_gradient_checkpointing
from .prompt_passes import PromptPasses, anchored
from .saving import (
    base_model_fingerprint,
    check_base_model,
    read_adapter_configs,
    read_bitune_config,
    read_trained_weights,
    save_bitune,
)
from .weights import FullWeights, FullWeightSwitch, copy_weights


class Prefilled(NamedTuple):
    """The mixed cache of a batch of prompts (every token but each prompt's last) and the left-padded
    prompts it was built from."""

    cache: Cache
    input_ids: torch.Tensor  # (B, T) left-padded prompts
    attention_mask: torch.Tensor  # (B, T)

    @property
    def positions(self) -> torch.Tensor:
        """(B, 1) the position of each prompt's last token: where decoding starts."""
        return self.attention_mask.sum(dim=1, keepdim=True) - 1


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
        peft_model: PeftModel | None,
        config: BituneConfig,
        mixing: KVMixing | None,
        support: BaseModelSupport,
        full_model: PreTrainedModel | None = None,
        full_weights: FullWeights | None = None,
    ) -> None:
        """``peft_model`` for PEFT adapters; ``full_model`` (and ``full_weights`` if the variant has a
        bidirectional side) for full fine-tuning (`bitune.method.weights`)."""
        super().__init__()
        if (peft_model is None) == (full_model is None):
            raise ValueError(
                "BituneModel needs a peft_model (PEFT adapters) or a full_model (full fine-tuning)"
            )
        self.peft_model = peft_model
        self.full_model = full_model
        self.full_weights = full_weights
        self.mixing = mixing
        self.bitune_config = config
        self.support = support
        self.adapters = (
            AdapterSwitch(peft_model) if peft_model is not None else FullWeightSwitch(full_weights)
        )
        self.prompt_passes = self._prompt_passes(config.prompt_pass_options)
        object.__setattr__(
            self, "_plain", None
        )  # the merged plain model (merge_for_inference); not a submodule
        object.__setattr__(self, "_joins", None)  # whether decode_joining is exact here (can_join checks)

    def _prompt_passes(self, options) -> PromptPasses:
        decoder = self.base_model.get_decoder()
        passes = self.bitune_config.prompt_passes
        return PromptPasses(decoder, passes, self.adapters, self.mixing, self.support, options)

    @contextmanager
    def prompt_pass_options(self, **changes) -> Iterator[None]:
        """Run the prompt passes differently inside the block (``stack``, ``recompute``; see
        `bitune.method.config.PromptPassOptions`); the model's own options are restored after it.

        Raises:
            ValueError: for an unknown option or a value the model cannot run.
        """
        previous = self.prompt_passes
        self.prompt_passes = self._prompt_passes(dataclasses.replace(previous.options, **changes))
        try:
            yield
        finally:
            self.prompt_passes = previous

    # ----------------------------------------------------------------------------------------- access
    @property
    def base_model(self) -> PreTrainedModel:
        """The Hugging Face model, with the adapters' layers injected (its own weights trained under full
        fine-tuning)."""
        return self.full_model if self.full_model is not None else self.peft_model.get_base_model()

    @property
    def is_full(self) -> bool:
        """Whether the model is fully fine-tuned (``finetune: full``) rather than through PEFT adapters."""
        return self.full_model is not None

    @property
    def config(self):
        """The base model's config (what Hugging Face tooling expects under ``model.config``)."""
        return self.base_model.config

    @property
    def generation_config(self):
        """The base model's generation config (read by TRL and other Hugging Face tooling)."""
        return self.base_model.generation_config

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the model card (Hugging Face tooling such as TRL adds its own)."""
        self.base_model.add_model_tags(tags)

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The base model's layer classes that must stay whole (what FSDP wraps one unit each)."""
        return getattr(self.base_model, "_no_split_modules", None)

    @property
    def adapter_configs(self) -> dict[str, PeftConfig]:
        """PEFT config of each adapter, as injected (the bidir one with its excluded modules); None for each
        weight set of a fully fine-tuned model."""
        if self.is_full:
            return dict.fromkeys(self.bitune_config.adapter_names)
        return {name: self.peft_model.peft_config[name] for name in self.bitune_config.adapter_names}

    def mixing_ratios(self) -> dict[str, list[float]]:
        """Per-layer bidirectional-to-causal ratio alpha for keys and values (empty without mixing)."""
        if self.mixing is None:
            return {"k": [], "v": []}
        alpha_k, alpha_v = self.mixing.ratios()
        return {"k": alpha_k.detach().cpu().tolist(), "v": alpha_v.detach().cpu().tolist()}

    def trainable_parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per adapter (per weight set under full fine-tuning) and for the mixing
        coefficients."""
        if self.is_full:
            sets = {CAUSAL_ADAPTER: self.full_model, BIDIR_ADAPTER: self.full_weights}
            counts = {
                f"weights {name}": sum(p.numel() for p in module.parameters() if p.requires_grad)
                for name, module in sets.items()
                if module is not None
            }
        else:
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
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_lengths: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        skip_logits: bool | None = None,
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
        if self.training and uses_gradient_checkpointing(self.base_model):
            raise ValueError(NO_CHECKPOINTING)
        if self.training and self.is_merged:
            raise ValueError("a model merged for inference cannot train (merge_for_inference); load it again")
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
        outputs: list[torch.Tensor] = []  # the prompt passes' last hidden states, kept in the loss's graph
        cache = self.prompt_passes(batch.prompt_ids, batch.prompt_mask, batch.prompt_positions, outputs)
        head = self._fusable_head()
        if skip_logits and batch.targets is not None and head is not None:
            hidden = self._answer_hidden(batch.answer, cache)
            loss = anchored(linear_cross_entropy(hidden, head, batch.targets, num_items_in_batch), outputs)
            return BituneCausalLMOutput(loss=loss, logits=None, answer_mask=batch.answer_mask)
        logits = self.decode(cache, **batch.answer.decode_inputs())
        loss = None
        if batch.targets is not None:
            loss = anchored(answer_loss(logits, batch.targets, num_items_in_batch), outputs)
        return BituneCausalLMOutput(
            loss=loss, logits=None if skip_logits else logits, answer_mask=batch.answer_mask
        )

    def _fusable_head(self) -> nn.Linear | None:
        """The LM head if the loss may bypass the logits: plain (probed at build), still a frozen
        ``nn.Linear`` (not wrapped by an adapter)."""
        head = self.base_model.get_output_embeddings()
        if not self.support.head_is_plain or type(head) is not nn.Linear:
            return None
        if any(p.requires_grad for p in head.parameters()):
            return None
        return head

    def decode(
        self,
        cache: Cache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The causal adapter's logits for tokens that continue a prompt cache: one decoding step (T = 1)
        or a whole continuation at once (the answer pass). ``cache`` grows by their K/V.

        Args:
            cache: a prefilled cache (`prefill`, `prefill_tokens`) or one that decoding has grown.
            input_ids: (B, T) the next tokens (right-padded if their lengths differ).
            attention_mask: (B, C + T): 1 over the real cache columns, then over the real new tokens.
            position_ids: (B, T) each new token's position in its row.

        Returns:
            (B, T, V) logits; ``logits[:, j]`` predicts the token after ``input_ids[:, j]``.
        """
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if self._plain is not None:  # merged: the causal adapter is in the plain model's weights
            return self._plain(**inputs, past_key_values=cache, use_cache=True).logits
        with self.adapters.use(CAUSAL_ADAPTER):
            return self.base_model(**inputs, past_key_values=cache, use_cache=True).logits

    def can_join(self, prompts: Sequence[Sequence[int]]) -> bool:
        """Whether `decode_joining` can prefill ``prompts`` inside a decoding step: a merged model, small
        prompts (`PromptPasses.can_join`), and a base model on which the joined forward was checked once to
        give the two forwards' results (`joining.py`)."""
        tokens = len(prompts) * (max(len(p) for p in prompts) - 1) if prompts else 0
        if not (self.is_merged and self.prompt_passes.can_join(tokens)):
            return False
        if self._joins is None:
            object.__setattr__(self, "_joins", joining_agrees(self))
        return self._joins

    def decode_joining(
        self,
        cache: Cache,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        prompts: Sequence[Sequence[int]],
        prefixes: CausalPrefixes | None = None,
    ) -> tuple[torch.Tensor, Started]:
        """`decode` for one step (T = 1), and for ``prompts`` `prefill_tokens` followed by `decode` of each
        one's last token, all in one forward (`joining.py`; check `can_join` first). With ``prefixes``, the
        causal pass reuses (and stores) the cached keys and values of the prompts' shared prefixes
        (`prefixes.py`).

        Returns:
            ``decode``'s (B, 1, V) logits, and ``prompts`` read whole with their first answer token's logits.
        """
        return self._joined((cache, input_ids, attention_mask, position_ids), prompts, prefixes)

    def prefill_joined(self, prompts: Sequence[Sequence[int]], prefixes: CausalPrefixes | None) -> Started:
        """`decode_joining` without decoding rows (check `can_join` first): ``prompts`` read whole, with the
        first answer token's logits, in one forward, reusing and storing ``prefixes``."""
        return self._joined(None, prompts, prefixes)[1]

    def _joined(self, step, prompts, prefixes: CausalPrefixes | None) -> tuple[torch.Tensor | None, Started]:
        ids, mask = left_padded(prompts, device=self.device)
        positions = padded_positions(mask)
        rows_ids, rows_positions, rows_mask, adapters = self.prompt_passes.stacked_rows(
            ids[:, :-1], mask[:, :-1], positions[:, :-1]
        )
        rows, width = rows_ids.shape
        cached = prefixes is not None and self.prompt_passes.caches_causal_prefix
        match = prefixes.match(prompts, width) if cached else None
        lead = match.width if match is not None else 0
        groups = [RowGroup(len(ids), width - lead, match), RowGroup(rows - len(ids), width)]
        groups = [g for g in groups if g.rows]
        decoding, decode_mask, single_ids, single_positions = None, None, [], []
        if step is not None:
            decoding, decode_ids, decode_padding, decode_positions = step
            decode_mask = decode_padding.bool()[:, None, None, :]
            single_ids, single_positions = [decode_ids.reshape(-1)], [decode_positions.reshape(-1)]
        joined = JoinedCache(
            decoding,
            groups,
            self.base_model.config,
            rows_mask,
            decode_mask,
            self.prompt_passes.row_mixer(len(ids)),
            mask.bool()[:, None, None, :],
        )

        def flat(prompt_part: torch.Tensor, singles: list[torch.Tensor]) -> torch.Tensor:
            """Each group's computed columns, then the decoding and the starting tokens, as one (1, N)."""
            parts = [prompt_part[:, lead:][: len(ids)].reshape(-1), prompt_part[len(ids) :].reshape(-1)]
            return torch.cat(parts + singles)[None]

        singles = len(ids) + (0 if step is None else len(decode_ids))
        tokens = [a for g, a in zip(_group_of(groups), adapters, strict=True) for _ in range(g.queries)]
        tokens += [CAUSAL_ADAPTER] * singles
        inputs = dict(
            input_ids=flat(rows_ids, [*single_ids, ids[:, -1]]),
            position_ids=flat(rows_positions, [*single_positions, positions[:, -1]]),
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ids.device),  # unused
            past_key_values=joined,
            use_cache=True,
        )
        with self.adapters.per_token(tokens), running_joined(self.base_model, joined):
            logits = self.base_model(**inputs, logits_to_keep=singles).logits[0]
        if cached:
            prefixes.add(
                prompts, [(layer.keys[: len(ids)], layer.values[: len(ids)]) for layer in joined.layers]
            )
        started = DynamicCache(config=self.base_model.config)
        for layer, (keys, values) in sorted(joined.started.items()):
            started.update(keys, values, layer)
        decoded = None if step is None else logits[: len(decode_ids), None]
        return decoded, Started(started, mask, logits[singles - len(ids) :])

    def _answer_hidden(self, answer: AnswerPass, cache: Cache) -> torch.Tensor:
        """The answer pass without the LM head: the decoder's last hidden states (B, Ta, H)."""
        with self.adapters.use(CAUSAL_ADAPTER):
            return self.base_model.get_decoder()(
                past_key_values=cache, use_cache=True, **answer.decode_inputs()
            ).last_hidden_state

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
        positions = padded_positions(attention_mask)
        return self.prompt_passes(input_ids[:, :-1], attention_mask[:, :-1].long(), positions[:, :-1])

    def prefill_tokens(self, prompts: Sequence[Sequence[int]]) -> Prefilled:
        """`prefill` for prompts given as token lists (of any lengths): they are left-padded into one batch.

        Returns:
            The cache and the left-padded ``input_ids`` / ``attention_mask`` it was built from; decoding
            starts from ``input_ids[:, -1:]`` (each prompt's last token) at ``positions``.
        """
        input_ids, attention_mask = left_padded(prompts, device=self.device)
        return Prefilled(self.prefill(input_ids, attention_mask), input_ids, attention_mask)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
    ):
        """Hugging Face ``generate`` decoding causally from the Bitune cache of the prompts.

        Accepts left- or right-padded prompts; returns what ``generate`` returns for the same prompts
        left-padded (same width), so ``output[:, input_ids.shape[1]:]`` are the new tokens.
        """
        if self._plain is not None:  # merged: decode with the plain model
            return generate_from_prefill(
                self._plain, self.prefill, nullcontext, input_ids, attention_mask, **generate_kwargs
            )
        return generate_from_prefill(
            self.base_model,
            self.prefill,
            lambda: self.adapters.use(CAUSAL_ADAPTER),
            input_ids,
            attention_mask,
            **generate_kwargs,
        )

    # ------------------------------------------------------------------------------------- inference
    @property
    def is_merged(self) -> bool:
        """Whether the causal adapter was merged into the base weights (`merge_for_inference`)."""
        return self._plain is not None

    def merge_for_inference(self) -> bool:
        """Decode at the plain model's speed: merge the causal adapter into the base weights (in place) and
        run the bidirectional pass with the exact difference of the two adapters (`bitune.method.merging`).
        The model is for inference only afterwards. Only plain LoRA merges; other PEFT methods keep the
        unmerged path.

        Returns:
            Whether the model is merged now.
        """
        if self.is_merged:
            return True
        if self.is_full:  # the causal weights are the model's own: decoding already runs the plain model
            object.__setattr__(self, "_plain", self.full_model.eval())
        elif merge_problem(self.adapters) is not None:
            return False
        else:
            merge_for_inference(self.adapters)
            object.__setattr__(self, "_plain", without_tuners(self.base_model).eval())
            self.prompt_passes = self._prompt_passes(self.prompt_passes.options)  # may stack now
        for param in self.parameters():
            param.requires_grad_(False)
        self.eval()
        return True

    # --------------------------------------------------------------------------------------- training
    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """Refused: Hugging Face's checkpointed layers drop the prompt caches (`NO_CHECKPOINTING`)."""
        raise ValueError(NO_CHECKPOINTING)

    gradient_checkpointing_enable = activation_checkpointing_enable

    @property
    def is_activation_checkpointing(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------ persistence
    def save_pretrained(
        self, save_directory: str | Path, trained: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Save adapters (PEFT format, one folder each), mixing coefficients and config (saving.py).

        ``trained`` gives the trained weights by parameter name (as `named_parameters` names them) instead
        of the model's own, e.g. gathered from a model sharded over processes; other names are ignored.

        Raises:
            ValueError: if a trained weight is NaN or infinite (nothing is written), or the model was merged
                for inference (its factors are no longer the trained ones).
        """
        if self.is_merged:
            raise ValueError(
                "a model merged for inference cannot be saved: save it before merge_for_inference"
            )
        meta = {
            "bitune": self.bitune_config.to_dict(),
            "base_model": base_model_fingerprint(self.base_model),
            "base_model_name_or_path": getattr(self.config, "name_or_path", None),
            "num_cache_layers": self.support.num_cache_layers,
        }
        mixing = dict(self.mixing.named_parameters()) if self.mixing is not None else None
        if trained is not None and mixing is not None:
            mixing = {k.removeprefix("mixing."): v for k, v in trained.items() if k.startswith("mixing.")}
        if self.is_full:
            state = trained if trained is not None else dict(self.named_parameters())
            weights = {
                CAUSAL_ADAPTER: {n: state[f"full_model.{n}"] for n, _ in self.full_model.named_parameters()}
            }
            if self.full_weights is not None:
                names = self.full_weights.names
                prefixed = {n: f"full_weights.{self.full_weights.parameter_name(n)}" for n in names}
                weights[BIDIR_ADAPTER] = {n: state[prefixed[n]] for n in names}
            save_bitune(save_directory, meta, self.adapter_configs, weights, mixing)
            return
        peft_state = None  # the adapters' own weights
        if trained is not None:
            peft_state = {
                k.removeprefix("peft_model."): v for k, v in trained.items() if k.startswith("peft_model.")
            }
        weights = {
            name: adapter_state_dict(self.peft_model, name, peft_state) for name in self.adapter_configs
        }
        save_bitune(save_directory, meta, self.adapter_configs, weights, mixing)

    def load_trained_weights(self, directory: str | Path) -> None:
        """Load the adapters and mixing coefficients saved in ``directory`` into this model (same
        configuration), e.g. to resume training.

        Raises:
            ValueError: if the saved weights do not fit the model's adapters or layers, or are not finite.
        """
        meta = read_bitune_config(directory)
        if meta["adapters"] != list(self.adapter_configs):
            raise ValueError(
                f"{directory} holds adapters {meta['adapters']}, the model has {list(self.adapter_configs)}"
            )
        saved = meta["bitune"].get("finetune", "peft")
        if saved != self.bitune_config.finetune:
            raise ValueError(
                f"{directory} was fine-tuned with finetune={saved!r}, the model has "
                f"finetune={self.bitune_config.finetune!r}"
            )
        adapters, thetas = read_trained_weights(directory, meta, device=self.device)
        for name, weights in adapters.items():
            if not self.is_full:
                load_adapter_state_dict(self.peft_model, name, weights)
            elif name == CAUSAL_ADAPTER:
                copy_weights(dict(self.full_model.named_parameters()), weights, "the causal weights")
            else:
                self.full_weights.load(weights)
        if (self.mixing is None) != (thetas is None):
            raise ValueError(f"{directory} and the model disagree on whether there are mixing coefficients")
        if self.mixing is not None:
            with torch.no_grad():
                for name, param in self.mixing.named_parameters():
                    if name not in thetas or thetas[name].shape != param.shape:
                        raise ValueError(f"{directory}: mixing has no {name} of shape {tuple(param.shape)}")
                    param.copy_(thetas[name].float())

    @classmethod
    def from_pretrained(
        cls, base_model: PreTrainedModel, directory: str | Path, is_trainable: bool = False
    ) -> BituneModel:
        """Load the Bitune model saved in a local ``directory`` onto ``base_model``; a base of another
        architecture or size is refused. (A published run's hub id: download it with
        `bitune.references.resolve_run` first; `bitune.inference.load_for_inference` does both.)"""
        meta = read_bitune_config(directory)
        check_base_model(meta, base_model, directory)
        try:
            config = BituneConfig.from_dict(meta["bitune"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{directory}: the saved Bitune config is invalid: {exc}") from None
        adapter_configs = None if config.finetune == "full" else read_adapter_configs(directory, meta)
        model = build_bitune_model(base_model, config, adapter_configs)
        model.load_trained_weights(directory)
        if not is_trainable:
            for param in model.parameters():
                param.requires_grad_(False)
            model.eval()
        return model


def get_bitune_model(model: PreTrainedModel, config: BituneConfig | None = None) -> BituneModel:
    """Wrap a Hugging Face decoder-only model for Bitune, like ``peft.get_peft_model``.

    The base weights are frozen; the variant's adapters and (if it mixes) its mixing coefficients train.
    With ``config.finetune="full"`` the model's own weights train instead, and a copy of them for the
    bidirectional side (`bitune.method.weights`); ``model`` is then trained in place.

    Raises:
        ValueError: for a model that is already a PeftModel, uses gradient checkpointing, keeps no
            attention cache or cannot run the variant's masks (see `bitune.method.probes`).
    """
    return build_bitune_model(model, config or BituneConfig(), adapter_configs=None)


def build_bitune_model(
    model: PreTrainedModel, config: BituneConfig, adapter_configs: dict[str, PeftConfig] | None
) -> BituneModel:
    """`get_bitune_model` with the adapters' PEFT configs given explicitly (as saved) or derived."""
    support = probe_base_model(model, [p.mask for p in config.prompt_passes])
    mixing = None
    if config.uses_mixing:
        mixing = KVMixing(support.num_cache_layers, config.theta_init, config.alpha_init, device=model.device)
    if config.finetune == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        full_weights = (
            FullWeights(model, support.kv_unreachable) if BIDIR_ADAPTER in config.adapter_names else None
        )
        return BituneModel(None, config, mixing, support, full_model=model, full_weights=full_weights)
    if adapter_configs is None:
        adapter_configs = {CAUSAL_ADAPTER: config.peft_config}
        if BIDIR_ADAPTER in config.adapter_names:
            adapter_configs[BIDIR_ADAPTER] = with_excluded_modules(config.peft_config, support.kv_unreachable)
    peft_model = create_peft_model(model, adapter_configs)
    return BituneModel(peft_model, config, mixing, support)


def _group_of(groups: list[RowGroup]) -> Iterator[RowGroup]:
    """Each prompt row's group, row by row."""
    for group in groups:
        yield from [group] * group.rows
