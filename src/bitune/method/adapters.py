"""The two PEFT adapters of Bitune and switching between them per pass.

The ``causal`` adapter reads the prompt causally and models the answer; the ``bidir`` adapter reads the
prompt a second time. Only the keys and values of each layer leave a prompt pass, so any module whose
output cannot reach a K/V (in the last layer: the query and output projections and the MLP; the LM head)
would give the bidir adapter parameters that never receive a gradient. Those modules are found by a probe
(`bitune.method.probes`) and excluded from that adapter (`with_excluded_modules`): parameter counts stay honest and
DDP needs no ``find_unused_parameters``.

PEFT's ``set_adapter`` also flips ``requires_grad`` (only the active adapter trains). Bitune trains both
adapters in one backward, so `AdapterSwitch` changes only which adapter a pass uses.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from . import compat
from .config import CAUSAL_ADAPTER


def with_excluded_modules(config: PeftConfig, names: list[str] | tuple[str, ...]) -> PeftConfig:
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


def adapter_state_dict(
    peft_model: PeftModel, name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The weights of adapter ``name`` in PEFT's saved form (what ``adapter_model.safetensors`` holds),
    taken from ``state_dict`` (keys as in ``peft_model.state_dict()``) when given."""
    return get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=name)


def load_adapter_state_dict(peft_model: PeftModel, name: str, weights: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state_dict`'s output into adapter ``name``.

    Raises:
        ValueError: if the weights do not fit the adapter (unexpected or missing keys, wrong shapes).
    """
    try:
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"adapter {name!r}: the saved weights do not fit the model ({exc})") from None
    missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"adapter {name!r}: the saved weights do not fit the model: unexpected {result.unexpected_keys[:5]}, "
            f"missing {missing[:5]}"
        )


class AdapterSwitch:
    """Switches the active adapter of every PEFT layer for one pass, leaving ``requires_grad`` alone.

    PEFT's ``set_adapter`` walks the whole module tree and re-sets ``requires_grad`` on every adapter
    (26 ms per switch on a 30-layer model here); this keeps the tuner layers in a list and only moves
    their active-adapter pointer, which is all a forward pass reads.
    """

    def __init__(self, peft_model: PeftModel) -> None:
        self.peft_model = peft_model
        self.merged = False  # the causal adapter is in the base weights (merging.py): using it is using none
        self.layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError("the PEFT model has no adapter layers: its config matched no module")
        for layer in self.layers:
            compat.check_peft_layer(layer)

    @property
    def current(self) -> str | list[str]:
        """The active adapter (PEFT keeps a one-element list after ``get_peft_model``; that is one name)."""
        active = self.peft_model.base_model.active_adapter
        return active[0] if isinstance(active, list) and len(active) == 1 else active

    def _set(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        compat.set_active_adapters(self.layers, names)
        self.peft_model.base_model.active_adapter = names[0] if len(names) == 1 else names

    def _active(self, name: str) -> list[str]:
        """The PEFT adapters that run for Bitune's adapter ``name`` (none for a merged causal adapter)."""
        return [] if self.merged and name == CAUSAL_ADAPTER else [name]

    def decoder(self, name: str, causal: torch.nn.Module) -> torch.nn.Module:
        """The decoder that runs a pass with adapter ``name``: every adapter lives in ``causal``'s layers."""
        return causal

    @property
    def can_route_rows(self) -> bool:
        """Whether `per_row` is exact for every layer (plain LoRA; not DoRA or IA3)."""
        return all(compat.routes_rows_exactly(m) for m in self.layers)

    @contextmanager
    def per_row(self, names: list[str]) -> Iterator[None]:
        """Inside the block, batch row i runs with adapter ``names[i]``.

        Every named adapter is active in every layer, and each adapter's ``lora_A`` sees its input
        multiplied by a 0/1 mask of its rows, so a row receives exactly its own adapter's update (and its
        gradient reaches only that adapter). This costs one extra rank-r product per layer; PEFT's own
        mixed-batch path (``adapter_names``, inference only there) gathers and scatters sub-batches
        instead and measured slower here.

        Raises:
            ValueError: if an adapter is not plain LoRA (`can_route_rows`).
        """
        with self._routed({name: torch.tensor([n == name for n in names]) for name in names}):
            yield

    @contextmanager
    def per_token(self, names: list[str]) -> Iterator[None]:
        """`per_row` for a batch of one row: inside the block, token t runs with adapter ``names[t]``."""
        with self._routed({name: torch.tensor([[n == name for n in names]]) for name in names}):
            yield

    @contextmanager
    def _routed(self, selected: dict[str, torch.Tensor]) -> Iterator[None]:
        """Inside the block, adapter ``name`` updates only the rows (or tokens) that ``selected[name]`` marks."""
        if not self.can_route_rows:
            raise ValueError(
                "per-row adapters need plain LoRA layers (DoRA, IA3 and others cannot be routed)"
            )
        unique = [name for name in selected if self._active(name)]

        def masked(name: str):
            def hook(module, args):
                x, chosen = args[0], selected[name]
                mask = chosen.to(device=x.device, dtype=x.dtype)
                return (x * mask.view(*mask.shape, *([1] * (x.dim() - mask.dim()))), *args[1:])

            return hook

        handles = [
            module.register_forward_pre_hook(masked(name))
            for layer in self.layers
            for name in unique
            if (module := compat.lora_input_module(layer, name)) is not None
        ]
        previous = self.current
        compat.set_active_adapters(self.layers, unique)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._set(previous)

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Make ``name`` the active adapter inside the block; the previous one is restored after it."""
        previous, wanted = self.current, self._active(name)
        if previous == (wanted[0] if len(wanted) == 1 else wanted):
            yield
            return
        self._set(wanted)
        try:
            yield
        finally:
            self._set(previous)
