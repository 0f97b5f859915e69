"""Full fine-tuning (``BituneConfig.finetune="full"``): the two sides of Bitune as two sets of full weights.

The ``causal`` set is the model's own parameters, all trained: it reads the prompt causally and models the
answer, as in plain full fine-tuning. The ``bidir`` set is a second decoder (`FullWeights.decoder`, a copy
of the model's decoder, no LM head) whose parameters that can change a cached K/V train (the probe of
`bitune.method.probes`; not the last layer's query, output projection and MLP, nor the final norm: those
stay frozen copies, which run but cannot reach the cache). A prompt pass with the bidir set runs that
decoder (`FullWeightSwitch.decoder`): the same code as every other pass, its own modules, so a sharded
training (FSDP2, ZeRO-3) gathers its weights like any other module's. Variants with one side (``lora``,
``naive_bidir``, ``shared_weights``) have no copy.

Saved as safetensors (sharded past `MAX_SHARD_SIZE`, with an index), one folder per set, keyed by the
model's own parameter names; `saving.py` writes and reads them.
"""

from __future__ import annotations

import copy
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
    """The bidir weight set of ``model``: a copy of its decoder (initialised equal, in the parameters'
    dtype) whose parameters outside the modules ``unreachable`` train.

    Raises:
        ValueError: if a parameter that can change the cached K/V lies outside the model's decoder.
    """

    def __init__(self, model: PreTrainedModel, unreachable: tuple[str, ...] | list[str]) -> None:
        super().__init__()
        decoder = model.get_decoder()
        prefix = next(name for name, module in model.named_modules() if module is decoder)
        prefix = f"{prefix}." if prefix else ""
        excluded = set(unreachable)
        self.names: list[str] = []  # the model's names of the trained copies
        own: dict[str, str] = {}  # model name -> name in the copy
        for name, _ in model.named_parameters():
            if name.rpartition(".")[0] in excluded:
                continue
            if not name.startswith(prefix):
                raise ValueError(
                    f"full fine-tuning: {name} can change the cached K/V but is not in the model's decoder "
                    f"({type(decoder).__name__}), which the bidirectional weight set copies"
                )
            self.names.append(name)
            own[name] = name.removeprefix(prefix)
        self.decoder = copy.deepcopy(decoder)
        params = dict(self.decoder.named_parameters())
        trained = set(own.values())
        for name, param in params.items():
            param.requires_grad_(name in trained)
        object.__setattr__(self, "_own", own)

    def state(self) -> dict[str, torch.Tensor]:
        """The trained copies by the model's parameter names."""
        params = dict(self.decoder.named_parameters())
        return {name: params[self._own[name]] for name in self.names}

    def parameter_name(self, name: str) -> str:
        """The `named_parameters` name (in this module) of the copy of the model's parameter ``name``."""
        return f"decoder.{self._own[name]}"

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` (by the model's parameter names) into the copies (`copy_weights`)."""
        copy_weights(self.state(), weights, "the bidir weights")


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
    """`AdapterSwitch`'s interface for full fine-tuning: a pass with the bidir set runs its own decoder
    (`decoder`); ``use`` only checks the name."""

    merged = False
    can_route_rows = False  # a row cannot run with other weights than its batch
    current = CAUSAL_ADAPTER

    def __init__(self, weights: FullWeights | None) -> None:
        self.weights = weights

    def _check(self, name: str) -> None:
        if name != CAUSAL_ADAPTER and (name != BIDIR_ADAPTER or self.weights is None):
            raise ValueError(
                f"no weight set {name!r} (full fine-tuning has {CAUSAL_ADAPTER!r} and {BIDIR_ADAPTER!r})"
            )

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run the block with the weight set ``name`` (its decoder is `decoder`'s)."""
        self._check(name)
        yield

    def decoder(self, name: str, causal: nn.Module) -> nn.Module:
        """The decoder that runs a pass with the weight set ``name`` (``causal``: the model's own)."""
        self._check(name)
        return self.weights.decoder if name == BIDIR_ADAPTER else causal

    def per_row(self, names: list[str]):
        raise ValueError("per-row adapters need plain LoRA layers; full weight sets cannot be routed per row")
