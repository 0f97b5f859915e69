"""The two PEFT adapters of Bitune and switching between them per pass.

The ``causal`` adapter reads the prompt causally and models the answer; the ``bidir`` adapter reads the
prompt a second time. Only the keys and values of each layer leave a prompt pass, so any module whose
output cannot reach a K/V (in the last layer: the query and output projections and the MLP; the LM head)
would give the bidir adapter parameters that never receive a gradient. They are found once, by autograd
on a two-token probe, and excluded from that adapter: parameter counts stay honest and DDP needs no
``find_unused_parameters``.

PEFT's ``set_adapter`` also flips ``requires_grad`` (only the active adapter trains). Bitune trains both
adapters in one backward, so `AdapterSwitch` changes only which adapter a pass uses.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import peft
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from .masks import ATTENTION_LAYER_TYPES


def modules_without_kv_influence(model: PreTrainedModel) -> tuple[list[str], int]:
    """Names of the parameterised leaf modules whose output cannot change any layer's cached K/V.

    Runs the model on two tokens with a zero added to each leaf module's output and asks autograd which
    of those zeros the cache depends on. Exact for the architecture, whatever its module names.

    Returns:
        (sorted module names, number of cache layers the model fills).
    """
    leaves = [
        (name, module)
        for name, module in model.named_modules()
        if name and not any(True for _ in module.children()) and any(True for _ in module.parameters(False))
    ]
    probes: dict[str, list[torch.Tensor]] = {}

    def probe(name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                zero = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                probes.setdefault(name, []).append(zero)
                return output + zero
            return None

        return hook

    layer_types = set(getattr(model.config, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if layer_types:  # checked before the forward, which some of these models fail with a cache we do not pass
        raise _not_attention(model, f"{sorted(layer_types)} layers")
    handles = [module.register_forward_hook(probe(name)) for name, module in leaves]
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            ids = torch.zeros((1, 2), dtype=torch.long, device=device)
            cache = getattr(model(input_ids=ids, use_cache=True), "past_key_values", None)
            if cache is None or not len(getattr(cache, "layers", ())):
                raise ValueError(
                    f"{type(model).__name__} returned no KV cache; Bitune needs a decoder with one"
                )
            other = {type(layer).__name__ for layer in cache.layers if not _holds_kv(layer)}
            if other:
                raise _not_attention(model, f"cache layers {sorted(other)}")
            total = sum(layer.keys.float().sum() + layer.values.float().sum() for layer in cache.layers)
            names = list(probes)
            flat = [z for n in names for z in probes[n]]
            grads = torch.autograd.grad(total, flat, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    reached, i = set(), 0
    for name in names:
        count = len(probes[name])
        if any(g is not None for g in grads[i : i + count]):
            reached.add(name)
        i += count
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


def with_excluded_modules(config: PeftConfig, names: list[str]) -> PeftConfig:
    """A copy of ``config`` that also excludes the modules ``names`` (full module names)."""
    config = copy.deepcopy(config)
    if not names:
        return config
    if not hasattr(config, "exclude_modules"):
        raise ValueError(
            f"{type(config).__name__} has no exclude_modules, so the bidirectional adapter cannot skip the "
            f"modules that never affect its K/V ({len(names)} modules)"
        )
    existing = config.exclude_modules
    if isinstance(existing, str):
        exact = "|".join(re.escape(n) for n in names)
        config.exclude_modules = f"(?:{existing})|(?:{exact})"
    else:
        config.exclude_modules = set(existing or ()) | set(names)
    return config


def create_peft_model(model: PreTrainedModel, configs: dict[str, PeftConfig]) -> PeftModel:
    """Wrap ``model`` with one adapter per entry of ``configs`` (the first is active); all adapters train."""
    names = list(configs)
    peft_model = get_peft_model(model, copy.deepcopy(configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, copy.deepcopy(configs[name]))
    for param in adapter_parameters(peft_model, names).values():
        param.requires_grad_(True)
    return peft_model


def adapter_parameters(
    peft_model: PeftModel, names: list[str] | tuple[str, ...]
) -> dict[str, torch.nn.Parameter]:
    """Parameters that belong to the adapters ``names`` (PEFT keys adapter weights by adapter name)."""
    wanted = set(names)
    return {n: p for n, p in peft_model.named_parameters() if wanted.intersection(n.split("."))}


class AdapterSwitch:
    """Switches the active adapter of every PEFT layer for one pass, leaving ``requires_grad`` alone.

    PEFT's ``set_adapter`` walks the whole module tree and re-sets ``requires_grad`` on every adapter
    (26 ms per switch on a 30-layer model here); this keeps the tuner layers in a list and only moves
    their active-adapter pointer, which is all a forward pass reads.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        self.peft_model = peft_model
        self.layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers or not all(hasattr(m, "_active_adapter") for m in self.layers):
            raise RuntimeError(
                f"peft {peft.__version__} keeps no per-layer active adapter where bitune expects it; "
                "please report this with your peft version"
            )

    @property
    def current(self) -> str:
        return self.peft_model.base_model.active_adapter

    def _set(self, name: str) -> None:
        for layer in self.layers:
            layer._active_adapter = [name]
        self.peft_model.base_model.active_adapter = name

    @property
    def can_route_rows(self) -> bool:
        """Whether `per_row` is exact for every layer: plain LoRA (no DoRA, whose weight normalisation also
        touches rows that bypass its low-rank path)."""
        return all(isinstance(m, LoraLinear) and not any(m.use_dora.values()) for m in self.layers)

    @contextmanager
    def per_row(self, names: list[str]) -> Iterator[None]:
        """Inside the block, batch row i runs with adapter ``names[i]``.

        Every named adapter is active in every layer, and each adapter's ``lora_A`` sees its input
        multiplied by a 0/1 mask of its rows, so a row receives exactly its own adapter's update (and its
        gradient reaches only that adapter). This costs one extra rank-r product per layer; PEFT's own
        mixed-batch path (``adapter_names``, inference only there) gathers and scatters sub-batches
        instead and measured slower here.
        """
        unique = list(dict.fromkeys(names))
        rows = {name: torch.tensor([n == name for n in names]) for name in unique}

        def masked(name: str):
            def hook(module, args):
                x = args[0]
                mask = rows[name].to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
                return (x * mask, *args[1:])

            return hook

        handles = [
            layer.lora_A[name].register_forward_pre_hook(masked(name))
            for layer in self.layers
            for name in unique
            if name in layer.lora_A
        ]
        previous = self.current
        for layer in self.layers:
            layer._active_adapter = unique
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._set(previous)

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Make ``name`` the active adapter inside the block; the previous one is restored after it."""
        previous = self.current
        if previous == name:
            yield
            return
        self._set(name)
        try:
            yield
        finally:
            self._set(previous)
