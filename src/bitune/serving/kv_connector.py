"""Bitune's mixed cache handed to vLLM: a KV connector (vLLM's KV Connector V1 API).

vLLM cannot read a prompt bidirectionally, but Bitune's decoding is an ordinary causal decode (the causal
adapter, a plain LoRA) from a cache that happens to be mixed. So this connector tells vLLM's scheduler that
every prompt token but the last is already computed, and before the forward that needs them it computes
their mixed cache exactly as `BituneModel.prefill` does (both prompt passes, batched over the requests of
the step) and writes each layer's keys and values into vLLM's paged cache through the attention backend's
own ``impl.do_kv_cache_update`` (on CPU, ``cpu_attn_reshape_and_cache``; on GPU the backend's
``reshape_and_cache_flash``): vLLM then runs the last prompt token and decodes with the causal adapter.

Loaded by vLLM by name::

    kv_transfer_config={"kv_connector": "BituneConnector", "kv_role": "kv_consumer",
                        "kv_connector_module_path": "bitune.serving.kv_connector",
                        "kv_connector_extra_config": {"run": "runs/chat", "dtype": "float32"}}

Correctness rests on three settings, checked by `check_vllm_settings` (``bitune serve --engine vllm`` sets
them): prefix caching off (a cached causal prefix would silently stand in for the mixed one), no tensor or
pipeline parallelism (each worker would need its own shard of the cache), and no sliding-window layers (the
paged cache of such a layer keeps only a window). A request that vLLM preempts loses its blocks and comes
back with nothing computed; the scheduler then asks this connector again and the mixed cache is written
again (`loads` counts every write, so tests can see it happen).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from ..inference import LoadedModel, load_for_inference

# Models already loaded in this process, by run path: `bitune serve --engine vllm` runs vLLM in its own
# process and registers the model it loaded, so the connector's worker side uses it instead of a second copy.
MODELS: dict[str, LoadedModel] = {}
_LOCK = threading.Lock()


def connector_config(run: str, dtype: str) -> dict[str, Any]:
    """The ``kv_transfer_config`` that makes vLLM use this connector for the Bitune run ``run``."""
    return {
        "kv_connector": BituneConnector.__name__,
        "kv_role": "kv_consumer",
        "kv_connector_module_path": __name__,
        "kv_connector_extra_config": {"run": run, "dtype": dtype},
    }


def model_for(run: str, dtype: str) -> LoadedModel:
    """The Bitune model of ``run``: the one registered in this process, else loaded once."""
    with _LOCK:
        if run not in MODELS:
            MODELS[run] = load_for_inference(run, dtype=getattr(torch, dtype))
        return MODELS[run]


def check_vllm_settings(vllm_config) -> None:
    """Raise ValueError for vLLM settings under which the injected cache would be wrong or incomplete."""
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "Bitune on vLLM needs prefix caching off (--no-enable-prefix-caching): a cached prefix holds the "
            "causal keys and values, and the mixed ones would never be used"
        )
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ValueError(
            "Bitune on vLLM runs on one worker (tensor_parallel_size and pipeline_parallel_size 1): the "
            "connector writes whole layers of the mixed cache"
        )
    text = vllm_config.model_config.hf_config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    if getattr(text, "sliding_window", None) or any("sliding" in str(t) for t in layer_types):
        raise ValueError(
            f"{vllm_config.model_config.model} has sliding-window attention layers; their paged cache keeps "
            "only a window, so the mixed cache of a whole prompt cannot be handed to vLLM (serve it with the "
            "built-in engine)"
        )


@dataclass
class _Load:
    """One request whose mixed cache is written this step: its whole prompt and its cache blocks."""

    request_id: str
    prompt: list[int]
    block_ids: list[int]


@dataclass
class BituneConnectorMetadata(KVConnectorMetadata):
    loads: list[_Load] = field(default_factory=list)


class BituneConnector(KVConnectorBase_V1):
    """See the module docstring."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_vllm_settings(vllm_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        if "run" not in extra:
            raise ValueError(
                "BituneConnector needs kv_connector_extra_config {'run': <Bitune run directory>}"
            )
        self.run, self.dtype = str(extra["run"]), str(extra.get("dtype", "float32"))
        self.block_size = vllm_config.cache_config.block_size
        self._pending: dict[str, _Load] = {}
        self.loads: Counter[str] = Counter()  # request id -> times its mixed cache was written (worker side)
        self._layers: list | None = None
        self.model = model_for(self.run, self.dtype).model if role == KVConnectorRole.WORKER else None

    # ------------------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        if num_computed_tokens:
            raise RuntimeError(
                f"request {request.request_id} has {num_computed_tokens} tokens computed before the mixed "
                "cache was written: prefix caching must be off"
            )
        return max(len(request.prompt_token_ids or ()) - 1, 0), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self._pending[request.request_id] = _Load(
                request.request_id, list(request.prompt_token_ids), list(blocks.get_block_ids()[0])
            )

    def build_connector_meta(self, scheduler_output) -> BituneConnectorMetadata:
        metadata = BituneConnectorMetadata(list(self._pending.values()))
        self._pending.clear()
        return metadata

    # -------------------------------------------------------------------------------- worker side
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        if not isinstance(metadata, BituneConnectorMetadata) or not metadata.loads:
            return
        layers = self._attention_layers(forward_context)
        with torch.no_grad():
            cache = self.model.prefill_tokens([load.prompt for load in metadata.loads]).cache
        slots = torch.cat([self._slots(load) for load in metadata.loads])
        if len(cache.layers) != len(layers):
            raise RuntimeError(
                f"the Bitune cache has {len(cache.layers)} layers and vLLM's model {len(layers)} attention layers"
            )
        for cache_layer, layer in zip(cache.layers, layers, strict=True):
            keys, values = (
                torch.cat(
                    [
                        side[row, :, side.shape[2] - (len(load.prompt) - 1) :].transpose(0, 1)
                        for row, load in enumerate(metadata.loads)
                    ]
                )
                .to(device=layer.kv_cache.device, dtype=layer.kv_cache.dtype)
                .contiguous()
                for side in (cache_layer.keys, cache_layer.values)
            )
            layer.impl.do_kv_cache_update(
                layer, keys, values, layer.kv_cache, slots.to(layer.kv_cache.device)
            )
        self.loads.update(load.request_id for load in metadata.loads)

    def _slots(self, load: _Load) -> torch.Tensor:
        """The paged-cache slot of each prompt token but the last."""
        positions = torch.arange(len(load.prompt) - 1)
        blocks = torch.tensor(load.block_ids, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def _attention_layers(self, forward_context) -> list:
        if self._layers is None:
            found = [
                (extract_layer_index(name), layer)
                for name, layer in forward_context.no_compile_layers.items()
                if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")
            ]
            self._layers = [layer for _, layer in sorted(found, key=lambda pair: pair[0])]
        return self._layers

    def wait_for_layer_load(self, layer_name: str) -> None:  # written whole before the forward
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:  # consumer only
        return

    def wait_for_save(self) -> None:
        return
