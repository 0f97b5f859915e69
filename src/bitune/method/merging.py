"""Serving a LoRA Bitune model at the plain model's decoding speed.

Decoding only ever uses the causal adapter, so for inference it is merged into the base weights,
``W_c = W + s_c B_c A_c``, and the answer pass and every decoding step run through the plain model: a copy of
the module tree without PEFT's wrappers that shares the (merged) weights. The prompt passes then need:

- the causal pass: ``W_c`` alone (no adapter);
- the bidirectional pass: ``W + s_b B_b A_b = W_c + s_b [B_b, -(s_c / s_b) B_c] [A_b; A_c]``, a LoRA of rank
  r_b + r_c on the merged weights, exact up to rounding. The bidir adapter's factors are replaced by these
  (its scaling kept), so the prompt passes run as before with the causal adapter switched off.

In fp32 the merged model's logits equal the unmerged ones to rounding (tested at 1e-4 on every architecture of
the test matrix). In bf16 the merged weights are rounded to bf16 once, where the unmerged model adds the fp32
adapter product to a bf16 result at every step: logits move by bf16 rounding and a greedy answer can change;
the served and the generated answers of one merged model agree. Only plain LoRA merges (`merge_problem`):
DoRA, IA3, LoRA with a bias or a variant, and per-module ranks keep the unmerged path. A merged model is
for inference only (training would need the factors apart again).
"""

from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import compat
from .adapters import AdapterSwitch
from .config import BIDIR_ADAPTER, CAUSAL_ADAPTER


def merge_problem(adapters: AdapterSwitch) -> str | None:
    """Why the adapters cannot be merged for inference, or None if they can: every tuner layer must hold
    Bitune's adapters as plain LoRA."""
    for layer in adapters.layers:
        for name in (CAUSAL_ADAPTER, BIDIR_ADAPTER):
            held = any(
                name in getattr(layer, a, {})
                for a in ("lora_A", "ia3_l", "lora_magnitude_vector", "hada_w1_a")
            )
            if held and compat.plain_lora_factors(layer, name) is None:
                return f"adapter {name!r} of a {type(layer).__name__} layer is not plain LoRA (DoRA, IA3, a bias or a variant)"
        if not any(name in getattr(layer, "lora_A", {}) for name in (CAUSAL_ADAPTER, BIDIR_ADAPTER)):
            return f"a {type(layer).__name__} layer holds no LoRA factors"
    return None


@torch.no_grad()
def merge_for_inference(adapters: AdapterSwitch) -> None:
    """Merge the causal adapter into the base weights and rewrite the bidir adapter as the difference (see the
    module docstring); afterwards the causal adapter must stay switched off (`AdapterSwitch.merged`).

    Raises:
        ValueError: if the adapters are not plain LoRA (`merge_problem`).
    """
    problem = merge_problem(adapters)
    if problem:
        raise ValueError(f"cannot merge for inference: {problem}")
    for layer in adapters.layers:
        causal = compat.plain_lora_factors(layer, CAUSAL_ADAPTER)
        if causal is None:
            continue
        bidir = compat.plain_lora_factors(layer, BIDIR_ADAPTER)
        if bidir is not None:  # rewrite it first: it needs the causal factors as they are
            a_b, b_b, s_b = bidir
            a_c, b_c, s_c = causal
            a = nn.Linear(a_b.in_features, a_b.out_features + a_c.out_features, bias=False)
            b = nn.Linear(a.out_features, b_b.out_features, bias=False)
            a.weight.copy_(torch.cat([a_b.weight, a_c.weight.to(a_b.weight.dtype)]))
            b.weight.copy_(torch.cat([b_b.weight, -(s_c / s_b) * b_c.weight.to(b_b.weight.dtype)], dim=1))
            layer.lora_A[BIDIR_ADAPTER] = a.to(a_b.weight.device, a_b.weight.dtype)
            layer.lora_B[BIDIR_ADAPTER] = b.to(b_b.weight.device, b_b.weight.dtype)
        base = layer.get_base_layer()
        base.weight.add_(compat.delta_weight(layer, CAUSAL_ADAPTER).to(base.weight.dtype))
    adapters.merged = True


def without_tuners(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree in which every PEFT tuner layer is its base layer: the plain model,
    sharing every parameter and buffer with ``module`` (nothing is copied but the tree)."""
    if isinstance(module, BaseTunerLayer):
        return without_tuners(module.get_base_layer())
    clone = copy.copy(module)
    clone._modules = {
        name: without_tuners(child) if child is not None else None for name, child in module._modules.items()
    }
    return clone
