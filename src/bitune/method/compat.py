"""The private parts of PEFT and transformers that bitune relies on, in one place.

Each is used because no public API does the job (why is next to each); each was checked on the versions in
`CHECKED_ON`. `check_peft_layer` runs whenever a Bitune model is built and `check_trainer` when training
starts, so a release that drops one of them fails at once with a message naming it, not deep inside a
forward pass; ``tests/test_compat.py`` runs both against the installed versions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from torch import nn

CHECKED_ON = {"peft": "0.21.2", "transformers": "5.23.0"}


class CompatibilityError(RuntimeError):
    """An installed PEFT or transformers release lacks an internal that bitune uses."""


def _missing(package: str, what: str) -> CompatibilityError:
    import importlib.metadata

    installed = importlib.metadata.version(package)
    return CompatibilityError(
        f"{package} {installed} has no {what}, which bitune uses (checked on {package} {CHECKED_ON[package]}); "
        f"install {package}=={CHECKED_ON[package]} or report this with your {package} version"
    )


# ------------------------------------------------------------------------------------------------ PEFT
# Switching the adapter of a pass: PEFT's public `set_adapter` also flips requires_grad on every other
# adapter (peft #1374), which would freeze the adapter of the other pass, so bitune moves each tuner
# layer's active-adapter pointer itself.


def check_peft_layer(layer: nn.Module) -> None:
    """Raise `CompatibilityError` if a PEFT tuner layer lacks what `set_active_adapters` writes."""
    if not hasattr(layer, "_active_adapter"):
        raise _missing("peft", f"{type(layer).__name__}._active_adapter (the per-layer active adapter)")


def set_active_adapters(layers: Iterable[nn.Module], names: list[str]) -> None:
    """Make ``names`` the active adapters of every tuner layer (several at once for per-row routing)."""
    for layer in layers:
        layer._active_adapter = list(names)


def lora_input_module(layer: nn.Module, name: str) -> nn.Module | None:
    """The ``lora_A`` module of adapter ``name`` in a LoRA layer (whose input per-row routing masks)."""
    lora_a = getattr(layer, "lora_A", None)
    return lora_a[name] if lora_a is not None and name in lora_a else None


def routes_rows_exactly(layer: nn.Module) -> bool:
    """Whether masking the input of ``lora_A`` gives each row only its own adapter's update: plain LoRA.
    DoRA's weight normalisation also touches rows that bypass its low-rank path."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return isinstance(layer, LoraLinear) and not any(getattr(layer, "use_dora", {}).values())


# --------------------------------------------------------------------------------------------- Trainer
# The Trainer saves and loads a custom (non-PreTrainedModel) model's whole state dict, base weights included;
# bitune's Trainer overrides these two methods to keep checkpoints to what trains. Their names and
# parameters must stay what the Trainer calls.
TRAINER_OVERRIDES = {
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
}


def check_trainer() -> None:
    """Raise `CompatibilityError` if the Trainer no longer has the methods bitune's Trainer overrides."""
    from transformers import Trainer

    for name, parameters in TRAINER_OVERRIDES.items():
        method = getattr(Trainer, name, None)
        if method is None or tuple(inspect.signature(method).parameters)[1:] != parameters:
            raise _missing("transformers", f"Trainer.{name}(self, {', '.join(parameters)})")


# ------------------------------------------------------------------------------------------ GGUF loading
def clear_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model stays flagged as quantized although its weights are dequantized, and
    ``save_pretrained`` and the Trainer refuse it; its weights are plain tensors, so the flags go."""
    for name in ("hf_quantizer", "is_quantized"):
        if not hasattr(model, name):
            raise _missing("transformers", f"PreTrainedModel.{name}")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --------------------------------------------------------------------------------- merging LoRA weights
# Merging the causal adapter into the base weights and rewriting the bidirectional adapter as the difference
# reads and writes a LoRA layer's factors; PEFT's own merge would stop every other adapter of the layer from
# running (a merged layer forwards through its base layer alone).


def plain_lora_factors(layer: nn.Module, name: str):
    """(lora_A, lora_B, scaling) of adapter ``name`` in a plain LoRA layer (no DoRA, bias or variant), or
    None if the layer has no such adapter or it is not plain LoRA."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(layer, LoraLinear) or name not in getattr(layer, "lora_A", {}):
        return None
    if layer.use_dora.get(name) or layer.lora_bias.get(name) or name in getattr(layer, "lora_variant", {}):
        return None
    return layer.lora_A[name], layer.lora_B[name], layer.scaling[name]


def delta_weight(layer: nn.Module, name: str):
    """``scaling * B @ A`` of adapter ``name``, laid out as the base layer's weight (GPT-2's Conv1D too)."""
    return layer.get_delta_weight(name)
