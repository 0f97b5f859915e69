"""The files of a saved Bitune model: only what was trained, in open formats. This module reads and writes
them; `BituneModel.save_pretrained` / `from_pretrained` decide what goes in.

A saved directory holds:

    bitune_config.json        BituneConfig, the base model's reference and fingerprint, format version
    causal/                   the causal adapter in PEFT's own format (adapter_config.json +
    bidir/                    adapter_model.safetensors); loadable by plain PEFT one at a time
    mixing.safetensors        theta_k, theta_v (fp32), for variants that mix

With full fine-tuning (``finetune: full``) ``causal/`` holds every parameter of the model and ``bidir/`` the
second copy (`bitune.method.weights`), as ``model.safetensors`` keyed by the model's parameter names, or
sharded with a ``model.safetensors.index.json`` when large (huggingface_hub's ``save_torch_state_dict``).

The root has no ``adapter_config.json`` on purpose: pointing plain PEFT at a Bitune directory fails
instead of silently using one adapter. Files are staged and moved into place with the config last, so an
interrupted save never leaves a half-written model that loads. Weights that are not finite (NaN, inf) are
never written and never read back: a diverged run fails loudly instead of being scored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .config import BIDIR_ADAPTER, CAUSAL_ADAPTER

FORMAT_VERSION = 1
CONFIG_NAME = "bitune_config.json"
MIXING_NAME = "mixing.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL_WEIGHTS = "model.safetensors"
FULL_INDEX = "model.safetensors.index.json"
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

Weights = dict[str, torch.Tensor]


def base_model_fingerprint(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture and size fields that a checkpoint's adapters depend on."""
    config = model.config.get_text_config()
    return {name: getattr(config, name, None) for name in _FINGERPRINT_FIELDS}


def check_base_model(meta: dict[str, Any], model: PreTrainedModel, directory: str | Path) -> None:
    """Raise ValueError if ``model`` differs in architecture or size from the base recorded in ``meta``."""
    expected, found = meta["base_model"], base_model_fingerprint(model)
    mismatched = {
        k: (expected.get(k), found.get(k)) for k in _FINGERPRINT_FIELDS if expected.get(k) != found.get(k)
    }
    if mismatched:
        detail = ", ".join(f"{k}: saved {a!r} vs given {b!r}" for k, (a, b) in mismatched.items())
        raise ValueError(
            f"the Bitune model in {directory} was trained on another base model "
            f"({meta.get('base_model_name_or_path')}); mismatch in {detail}"
        )


def check_finite(weights: Weights, where: str) -> None:
    """Raise ValueError naming the first tensor of ``weights`` with a NaN or infinite value."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"{where}: {name} has non-finite values (NaN or inf): training diverged; use an earlier "
                "checkpoint or a lower learning rate"
            )


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, contiguous, copied where it is a view of a larger storage (DeepSpeed's flat
    parameter buffers), which safetensors would refuse to save as a shared tensor."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() > tensor.nbytes:
        return tensor.to("cpu", copy=True)
    return tensor.cpu()


def save_bitune(
    directory: str | Path,
    meta: dict[str, Any],
    adapter_configs: dict[str, PeftConfig | None],
    adapter_weights: dict[str, Weights],
    mixing: Weights | None,
) -> None:
    """Write a Bitune model into ``directory``; other files there are left alone. An adapter whose config
    is None is a full weight set (sharded safetensors).

    Everything is first written to a staging folder inside ``directory``. The old config is removed
    before the new files are moved in and the new config is moved in last, so a reader (which starts
    from the config) never sees a mix of two saves, and a failed write leaves the previous save intact.

    Raises:
        ValueError: if a weight is not finite (nothing is written).
    """
    for name, weights in adapter_weights.items():
        check_finite(weights, f"adapter {name!r}")
    check_finite(mixing or {}, "mixing")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bitune-save-", dir=directory))
    try:
        for name, adapter_config in adapter_configs.items():
            folder = staging / name
            folder.mkdir()
            tensors = {k: _own_storage(v) for k, v in adapter_weights[name].items()}
            if adapter_config is None:
                from huggingface_hub import save_torch_state_dict

                from .weights import MAX_SHARD_SIZE

                save_torch_state_dict(tensors, folder, max_shard_size=MAX_SHARD_SIZE)
                continue
            adapter_config.save_pretrained(str(folder))
            save_file(tensors, str(folder / ADAPTER_WEIGHTS))
        if mixing is not None:
            save_file(
                {n: p.detach().float().contiguous().cpu() for n, p in mixing.items()},
                str(staging / MIXING_NAME),
            )
        meta = {"format_version": FORMAT_VERSION, **meta, "adapters": list(adapter_configs)}
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
        hint = (
            "; for a published run's hub id, download it first (bitune.references.resolve_run)"
            if not Path(directory).exists() and str(directory).count("/") == 1
            else ""
        )
        raise FileNotFoundError(f"{directory} is not a saved Bitune model: {CONFIG_NAME} is missing{hint}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the saved model is damaged") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} has format_version {found!r}; this bitune reads {FORMAT_VERSION}")
    adapters = meta.get("adapters")
    if (
        not isinstance(adapters, list)
        or not adapters
        or not set(adapters) <= {CAUSAL_ADAPTER, BIDIR_ADAPTER}
        or not isinstance(meta.get("bitune"), dict)
        or not isinstance(meta.get("base_model"), dict)
    ):
        raise ValueError(
            f"{path} is damaged: it needs 'bitune' and 'base_model' objects and 'adapters' among "
            f"{[CAUSAL_ADAPTER, BIDIR_ADAPTER]}"
        )
    return meta


def read_adapter_configs(directory: str | Path, meta: dict[str, Any]) -> dict[str, PeftConfig]:
    """The PEFT config of each saved adapter, ready to train further."""
    configs = {}
    for name in meta["adapters"]:
        try:
            config = PeftConfig.from_pretrained(str(Path(directory) / name))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{Path(directory) / name}: cannot read the adapter's config ({exc})") from None
        if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
            raise ValueError(
                f"{Path(directory) / name}: the adapter trains whole modules (modules_to_save), which a Bitune "
                "model never saves; it was not written by bitune"
            )
        config.inference_mode = False
        configs[name] = config
    return configs


def read_trained_weights(
    directory: str | Path, meta: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[dict[str, Weights], Weights | None]:
    """(adapter name -> PEFT state dict, mixing coefficients or None) saved in ``directory``.

    Raises:
        ValueError: for a damaged or non-finite file.
    """
    directory = Path(directory)
    full = meta["bitune"].get("finetune") == "full"
    adapters = {
        name: _load_full(directory / name, device)
        if full
        else _load(directory / name / ADAPTER_WEIGHTS, device)
        for name in meta["adapters"]
    }
    mixing = _load(directory / MIXING_NAME, "cpu") if (directory / MIXING_NAME).exists() else None
    return adapters, mixing


def _load_full(folder: Path, device: torch.device | str) -> Weights:
    """A full weight set: ``model.safetensors``, or the shards its index names."""
    index = folder / FULL_INDEX
    if not index.is_file():
        return _load(folder / FULL_WEIGHTS, device)
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{index}: cannot read the shard index ({exc}); the saved model is damaged"
        ) from None
    weights: Weights = {}
    for name in files:
        weights.update(_load(folder / name, device))
    return weights


def _load(path: Path, device: torch.device | str) -> Weights:
    try:
        weights = load_file(str(path), device=str(device))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: cannot read saved weights ({exc}); the saved model is damaged") from None
    check_finite(weights, str(path))
    return weights
