"""What Bitune needs to know about a base model, found once by running it on tiny probes at build time.

`probe_base_model` returns a frozen `BaseModelSupport`, or raises a ``ValueError`` that says why the model
cannot run the variant (and what can). The probes ask the model, not its class name, so every decoder that
transformers supports is judged by what it actually does:

- which modules can affect the cached K/V (autograd on two tokens): the others would give the bidir adapter
  parameters that never get a gradient, so they are left out of it; refused: caches that are not attention
  K/V (state-space, linear-attention, convolution layers);
- whether each non-causal mask the variant uses lets a token see a later one (some families build their
  own causal mask and drop ``is_causal=False`` or a 4D mask: their "bidirectional" pass would silently be
  causal); where ``is_causal`` is dropped but an explicit 4D mask works, the pass uses that;
- whether one forward with a different explicit mask per row works (two prompt passes stacked);
- whether the logits are exactly the output embedding of the last hidden state (then the loss can skip
  materialising them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from .masks import ATTENTION_LAYER_TYPES, explicit_mask, layer_attention_types, prompt_pass_kwargs

NO_CHECKPOINTING = (
    "Bitune does not support Hugging Face's gradient checkpointing: its checkpointed layers drop the KV caches "
    "that carry the prompt passes into the answer pass. Turn it off; to save memory, recompute the prompt "
    "passes in backward instead (BituneConfig(checkpoint_prompt_passes=True), or training.checkpoint_prompt_passes "
    "in a run config), or use a smaller micro-batch with gradient accumulation."
)


@dataclass(frozen=True)
class BaseModelSupport:
    """What the probes found about a base model (see the module docstring)."""

    num_cache_layers: int  # layers that fill the KV cache (one mixing coefficient pair each)
    kv_unreachable: tuple[str, ...]  # leaf modules whose output cannot change any cached K/V
    head_is_plain: bool  # logits == output embedding applied to the decoder's last hidden state
    explicit_masks: frozenset[str] = frozenset()  # mask kinds given as explicit 4D masks (is_causal dropped)
    stacking_problem: str | None = None  # why one forward with per-row masks fails (None: it works)


def probe_base_model(model: PreTrainedModel, mask_kinds: list[str]) -> BaseModelSupport:
    """Probe ``model`` for the prompt masks ``mask_kinds`` of a variant.

    Raises:
        ValueError: the model is not a plain transformers model, uses gradient checkpointing, keeps no
            attention KV cache, or cannot honour a non-causal mask the variant needs.
    """
    if isinstance(model, PeftModel):
        raise ValueError("get_bitune_model expects a plain transformers model, got a PeftModel")
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"get_bitune_model expects a transformers PreTrainedModel, got {type(model).__name__}"
        )
    if uses_gradient_checkpointing(model):
        raise ValueError(NO_CHECKPOINTING)
    unreachable, num_cache_layers = modules_without_kv_influence(model)
    explicit, stacking_problem = _mask_support(model, mask_kinds)
    return BaseModelSupport(
        num_cache_layers=num_cache_layers,
        kv_unreachable=tuple(unreachable),
        head_is_plain=plain_lm_head(model),
        explicit_masks=explicit,
        stacking_problem=stacking_problem,
    )


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# ----------------------------------------------------------------------------------- K/V reachability
def modules_without_kv_influence(model: PreTrainedModel) -> tuple[list[str], int]:
    """Names of the parameterised leaf modules whose output cannot change any layer's cached K/V.

    Runs the model on two tokens with a zero added to each leaf module's output and asks autograd which
    of those zeros the cache depends on. Exact for the architecture, whatever its module names.

    Returns:
        (sorted module names, number of cache layers the model fills).
    """
    layer_types = set(getattr(model.config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if layer_types:  # checked before the forward, which some of these models fail with a cache we do not pass
        raise _not_attention(model, f"{sorted(layer_types)} layers")
    leaves = [
        (name, module)
        for name, module in model.named_modules()
        if name and not any(True for _ in module.children()) and any(True for _ in module.parameters(False))
    ]
    zeros: dict[str, list[torch.Tensor]] = {}

    def add_zero(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                zero = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                zeros.setdefault(name, []).append(zero)
                return output + zero
            return None

        return hook

    handles = [module.register_forward_hook(add_zero(name)) for name, module in leaves]
    try:
        with torch.enable_grad():
            ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
            cache = getattr(model(input_ids=ids, use_cache=True), "past_key_values", None)
            if cache is None or not len(getattr(cache, "layers", ())):
                raise ValueError(
                    f"{type(model).__name__} returned no KV cache; Bitune needs a decoder with one"
                )
            other = {type(layer).__name__ for layer in cache.layers if not _holds_kv(layer)}
            if other:
                raise _not_attention(model, f"cache layers {sorted(other)}")
            total = sum(layer.keys.float().sum() + layer.values.float().sum() for layer in cache.layers)
            names = list(zeros)
            grads = torch.autograd.grad(total, [z for n in names for z in zeros[n]], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    reached, i = set(), 0
    for name in names:
        if any(g is not None for g in grads[i : i + len(zeros[name])]):
            reached.add(name)
        i += len(zeros[name])
    return sorted(set(names) - reached), len(cache.layers)


def _not_attention(model: PreTrainedModel, what: str) -> ValueError:
    return ValueError(
        f"{type(model).__name__} has {what} whose cached state is not attention keys and values (state-space, "
        "linear-attention or convolution layers); Bitune mixes per-layer attention K/V caches and supports "
        "decoders whose every layer is attention"
    )


def _holds_kv(layer) -> bool:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    return isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.numel() > 0


# ---------------------------------------------------------------------------------------------- masks
def _mask_support(model: PreTrainedModel, kinds: list[str]) -> tuple[frozenset[str], str | None]:
    """(mask kinds that need explicit 4D masks, why stacked passes cannot work or None).

    Raises:
        ValueError: if a non-causal mask among ``kinds`` cannot be honoured at all.
    """
    kinds = [k for k in dict.fromkeys(kinds) if k != "causal"]
    if not kinds or len(layer_attention_types(model.config)) < 2:  # a one-layer model cannot be checked
        return frozenset(), None
    dtype = model.dtype  # the float dtype of the attention scores (first parameters may be quantised)
    padding = torch.ones((1, 3), dtype=torch.long, device=next(model.parameters()).device)
    stacking_problem = mask_problem(
        model, {"attention_mask": explicit_mask(kinds[:1], padding, model.config, dtype)}
    )
    explicit = set()
    for kind in kinds:
        problem = mask_problem(model, prompt_pass_kwargs(kind, padding, model.config, dtype))
        if problem is None:
            continue
        if kind == "bidirectional" and stacking_problem is None:
            explicit.add(kind)  # is_causal=False is dropped, but an explicit 4D mask works
            continue
        raise ValueError(
            f"{type(model).__name__} cannot run the {kind} prompt pass: {problem}. Its attention does not take "
            "transformers' is_causal=False / 4D masks; only a causal variant ('lora', 'only_causal') can run on it"
        )
    return frozenset(explicit), stacking_problem


@torch.no_grad()
def mask_problem(model: PreTrainedModel, mask_kwargs: dict) -> str | None:
    """Why a forward with ``mask_kwargs`` does not let the first of three tokens see a later one, or None.

    Reads three tokens twice, changing only the last: unless the first token's keys in the layers after
    the first change, it saw no later token. Runs in eval mode, so dropout cannot fake a difference.
    """
    vocab = model.config.vocab_size
    first = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device) % vocab
    second = first.clone()
    second[0, -1] = (first[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        keys = [_first_token_keys(model, ids, mask_kwargs) for ids in (first, second)]
    except Exception as error:  # any failure means this mask cannot be used
        return f"{type(error).__name__}: {error}"
    finally:
        model.train(was_training)
    if all(torch.equal(a, b) for a, b in zip(*keys, strict=True)):
        return "the mask is ignored: no token sees a later one"
    return None


def _first_token_keys(model: PreTrainedModel, ids: torch.Tensor, mask_kwargs: dict) -> list[torch.Tensor]:
    cache = model(input_ids=ids, use_cache=True, **mask_kwargs).past_key_values
    return [layer.keys[..., 0, :] for layer in cache.layers[1:]]


# ------------------------------------------------------------------------------------------------ head
@torch.no_grad()
def plain_lm_head(model: PreTrainedModel) -> bool:
    """Whether the model's logits are exactly its output embedding (an ``nn.Linear``) applied to its
    decoder's last hidden state, checked on a three-token probe."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return False
    decoder = model.get_decoder()
    seen = {}
    handle = decoder.register_forward_hook(lambda module, args, out: seen.update(hidden=out[0]))
    try:
        ids = torch.arange(1, 4, device=head.weight.device)[None] % model.config.vocab_size
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    hidden = seen.get("hidden")
    return hidden is not None and hidden.shape[:2] == logits.shape[:2] and torch.equal(head(hidden), logits)
