"""Full fine-tuning (``BituneConfig.finetune="full"``): the two sides of Bitune as two sets of full weights.

The ``causal`` set is the model's own parameters, all trained: it reads the prompt causally and models the
answer, as in plain full fine-tuning. The ``bidir`` set is a second, trained copy of every parameter whose
module can change a cached K/V (the probe of `bitune.method.probes`; not the LM head, nor the last layer's
query, output projection and MLP). A prompt pass with the bidir set swaps those parameters into their
modules for the length of the pass (`FullWeightSwitch.use`): one forward through the same modules and the
same code as every other pass, the gradient reaching the copies. Variants with one side (``lora``,
``naive_bidir``, ``shared_weights``) have no copy.

Saved as safetensors (sharded past `MAX_SHARD_SIZE`, with an index), one folder per set, keyed by the
model's own parameter names; `saving.py` writes and reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import BIDIR_ADAPTER, CAUSAL_ADAPTER

MAX_SHARD_SIZE = "5GB"


def _key(name: str) -> str:
    return name.replace(".", "__")  # a ParameterDict key cannot hold dots


class FullWeights(nn.Module):
    """The bidir copies of ``model``'s parameters outside the modules ``unreachable`` (initialised equal,
    in the parameter's dtype, trainable)."""

    def __init__(self, model: PreTrainedModel, unreachable: tuple[str, ...] | list[str]) -> None:
        super().__init__()
        excluded = set(unreachable)
        modules = dict(model.named_modules())
        self.names: list[str] = []
        self.bidir = nn.ParameterDict()
        slots = []  # (module, attribute, copy): where each copy goes during a bidir pass
        for name, param in model.named_parameters():
            module_name, _, attr = name.rpartition(".")
            if module_name in excluded:
                continue
            self.names.append(name)
            self.bidir[_key(name)] = nn.Parameter(param.detach().clone(), requires_grad=True)
            slots.append((modules[module_name], attr, self.bidir[_key(name)]))
        object.__setattr__(self, "_slots", slots)  # kept out of the module tree

    def state(self) -> dict[str, torch.Tensor]:
        """The copies by the model's parameter names."""
        return {name: self.bidir[_key(name)] for name in self.names}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` (by the model's parameter names) into the copies (`copy_weights`)."""
        copy_weights(self.state(), weights, "the bidir weights")

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the model's modules hold the copies (the previous parameters after it)."""
        previous = [(module, attr, module._parameters[attr]) for module, attr, _ in self._slots]
        for module, attr, copy in self._slots:
            module._parameters[attr] = copy
        try:
            yield
        finally:
            for module, attr, param in previous:
                module._parameters[attr] = param


def copy_weights(params: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``weights`` into ``params`` (the same names, every one of them).

    Raises:
        ValueError: naming ``what``, if the names or shapes differ (nothing is copied).
    """
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    shapes = [n for n in params if n in weights and tuple(weights[n].shape) != tuple(params[n].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: the saved weights do not fit the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {shapes[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


class FullWeightSwitch:
    """`AdapterSwitch`'s interface for full fine-tuning: ``use("bidir")`` swaps the bidir copies in."""

    merged = False
    can_route_rows = False  # a row cannot run with other weights than its batch

    def __init__(self, weights: FullWeights | None) -> None:
        self.weights = weights
        self.current = CAUSAL_ADAPTER

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run the block with the weight set ``name``."""
        if name == self.current:
            yield
            return
        if name != BIDIR_ADAPTER or self.weights is None:
            raise ValueError(
                f"no weight set {name!r} (full fine-tuning has {CAUSAL_ADAPTER!r} and {BIDIR_ADAPTER!r})"
            )
        self.current = name
        try:
            with self.weights.swapped_in():
                yield
        finally:
            self.current = CAUSAL_ADAPTER

    def per_row(self, names: list[str]):
        raise ValueError("per-row adapters need plain LoRA layers; full weight sets cannot be routed per row")
