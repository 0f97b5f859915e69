"""Saving and loading a Bitune model: only what was trained, in open formats.

A saved directory holds:

    bitune_config.json        BituneConfig, the base model's fingerprint, format version
    causal/                   the causal adapter in PEFT's own format (adapter_config.json +
    bidir/                    adapter_model.safetensors); loadable by plain PEFT one at a time
    mixing.safetensors        theta_k, theta_v (fp32), for variants that mix

The root has no ``adapter_config.json`` on purpose: pointing plain PEFT at a Bitune directory fails
instead of silently using one adapter. Files are staged and moved into place with the config last, so an
interrupted save never leaves a half-written model that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .config import BIDIR_ADAPTER, CAUSAL_ADAPTER, BituneConfig

FORMAT_VERSION = 1
CONFIG_NAME = "bitune_config.json"
MIXING_NAME = "mixing.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_OWN_ENTRIES = (CAUSAL_ADAPTER, BIDIR_ADAPTER, MIXING_NAME)
_FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def base_model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture and size fields that a checkpoint's adapters depend on."""
    config = model.config.get_text_config()
    return {name: getattr(config, name, None) for name in _FINGERPRINT_FIELDS}


def save_bitune(model, directory: str | Path) -> None:
    """Write ``model`` (a BituneModel) into ``directory``; other files there are left alone.

    Everything is first written to a staging folder inside ``directory``. The old config is removed
    before the new files are moved in and the new config is moved in last, so a reader (which starts
    from the config) never sees a mix of two saves, and a failed write leaves the previous save intact.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bitune-save-", dir=directory))
    try:
        for name, adapter_config in model.adapter_configs.items():
            folder = staging / name
            folder.mkdir()
            adapter_config.save_pretrained(str(folder))
            weights = get_peft_model_state_dict(model.peft_model, adapter_name=name)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(folder / ADAPTER_WEIGHTS)
            )
        if model.mixing is not None:
            save_file(
                {n: p.detach().float().contiguous().cpu() for n, p in model.mixing.named_parameters()},
                str(staging / MIXING_NAME),
            )
        meta = {
            "format_version": FORMAT_VERSION,
            "bitune": model.bitune_config.to_dict(),
            "base_model": base_model_fingerprint(model.base_model),
            "base_model_name_or_path": getattr(model.config, "name_or_path", None),
            "num_cache_layers": model.num_cache_layers,
            "adapters": list(model.adapter_configs),
        }
        (staging / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        for entry in (*_OWN_ENTRIES, CONFIG_NAME):  # stale entries of an earlier save go too
            target = directory / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if (staging / entry).exists():
                os.replace(staging / entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_bitune_config(directory: str | Path) -> dict[str, Any]:
    """The metadata of a saved Bitune directory, with a clear error if it is not one."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved Bitune model: {CONFIG_NAME} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {meta.get('format_version')!r}; this bitune reads {FORMAT_VERSION}"
        )
    return meta


def load_bitune(base_model: PreTrainedModel, directory: str | Path, is_trainable: bool = False):
    """Rebuild the saved Bitune model on ``base_model`` and load its adapters and mixing coefficients.

    Raises:
        ValueError: if ``base_model`` differs in architecture or size from the model that was saved.
    """
    from .model import build_bitune_model

    directory = Path(directory)
    meta = read_bitune_config(directory)
    expected, found = meta["base_model"], base_model_fingerprint(base_model)
    mismatched = {
        k: (expected.get(k), found.get(k)) for k in _FINGERPRINT_FIELDS if expected.get(k) != found.get(k)
    }
    if mismatched:
        detail = ", ".join(f"{k}: saved {a!r} vs given {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"the Bitune model in {directory} was trained on another base model "
            f"({meta.get('base_model_name_or_path')}); mismatch in {detail}"
        )
    config = BituneConfig.from_dict(meta["bitune"])
    adapter_configs = {name: PeftConfig.from_pretrained(str(directory / name)) for name in meta["adapters"]}
    for adapter_config in adapter_configs.values():
        adapter_config.inference_mode = False
    model = build_bitune_model(base_model, config, adapter_configs)
    load_weights_into(model, directory)
    if not is_trainable:
        for param in model.parameters():
            param.requires_grad_(False)
        model.eval()
    return model


def load_weights_into(model, directory: str | Path) -> None:
    """Load the adapters and mixing coefficients saved in ``directory`` into an existing BituneModel
    of the same configuration (e.g. to resume training).

    Raises:
        ValueError: if the saved weights do not fit the model's adapters or layers.
    """
    directory = Path(directory)
    meta = read_bitune_config(directory)
    if meta["adapters"] != list(model.adapter_configs):
        raise ValueError(
            f"{directory} holds adapters {meta['adapters']}, the model has {list(model.adapter_configs)}"
        )
    for name in meta["adapters"]:
        weights = load_file(str(directory / name / ADAPTER_WEIGHTS), device=str(model.device))
        result = set_peft_model_state_dict(model.peft_model, weights, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter {name!r} in {directory} does not fit the model: unexpected {result.unexpected_keys[:5]}, "
                f"missing {missing[:5]}"
            )
    if (model.mixing is None) != (not (directory / MIXING_NAME).exists()):
        raise ValueError(f"{directory} and the model disagree on whether there are mixing coefficients")
    if model.mixing is not None:
        thetas = load_file(str(directory / MIXING_NAME))
        with torch.no_grad():
            for name, param in model.mixing.named_parameters():
                if name not in thetas or thetas[name].shape != param.shape:
                    raise ValueError(f"{directory}/{MIXING_NAME} has no {name} of shape {tuple(param.shape)}")
                param.copy_(thetas[name].float())
