"""vLLM behind ``bitune serve --engine vllm``: the same endpoints, vLLM's continuous batching and paged KV.

vLLM runs in this process (its engine core in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) on the run's
base model, with the run's causal adapter as a vLLM LoRA (the ``causal/`` folder is PEFT's own format, which
vLLM loads as is). For a Bitune run (any variant that reads the prompt twice or bidirectionally), the
`BituneConnector` hands vLLM the mixed cache of every prompt token but the last, computed by the Bitune
model this server loaded; a base model or a ``lora`` run is served by vLLM alone. Prompts travel as token
ids, so both sides see the same tokens. Text, stop strings, ``max_tokens`` and logprobs go through the same
code as the built-in engine (`Engine`); vLLM samples (greedy = the built-in engine's, token for token; a
seeded sampled request is reproducible on vLLM, but draws other samples than the built-in engine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..inference import LoadedModel
from ..method.saving import read_bitune_config
from ..references import PACKAGED_MODELS, is_hub_id, packaged_model_path
from .engine import Completion, Engine, GenerationRequest, TokenLogprob, _Row

# vLLM options that bitune sets itself: the engine would be wrong (or not Bitune) with another value.
OWN_OPTIONS = ("model", "enable_prefix_caching", "kv_transfer_config", "enable_lora", "max_num_seqs", "dtype")


def parse_vllm_args(argv: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """vLLM's engine options as on its own command line (``--max-model-len 4096``), parsed by vLLM's
    parser: only those given, as ``EngineArgs`` fields.

    Raises:
        ValueError: for an option vLLM does not know, or one that bitune sets itself.
    """
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm options", exit_on_error=False))
    try:
        given, unknown = parser.parse_known_args(list(argv))
        defaults = parser.parse_args([])
    except (SystemExit, Exception) as exc:
        raise ValueError(f"bad vLLM options {list(argv)}: {exc}") from None
    if unknown:
        raise ValueError(f"vLLM does not know the options {unknown} (see vLLM's engine arguments)")
    options = {k: v for k, v in vars(given).items() if v != getattr(defaults, k, None)}
    clashing = sorted(set(options) & set(OWN_OPTIONS))
    if clashing:
        raise ValueError(
            f"vLLM options {clashing} are set by bitune serve --engine vllm (prefix caching is off: a cached "
            "causal prefix would stand in for Bitune's mixed one; --dtype is bitune serve's own)"
        )
    return options


def base_model_dir(loaded: LoadedModel) -> str:
    """What vLLM loads: the base model's directory (a packaged alias's converted copy) or hub id."""
    target = Path(loaded.name)
    reference = read_bitune_config(target)["base_model_name_or_path"] if _is_run(target) else loaded.name
    if reference in PACKAGED_MODELS:
        return str(packaged_model_path(reference))
    if Path(reference).is_dir() or is_hub_id(reference):
        return str(reference)
    raise ValueError(
        f"vLLM cannot load the base model {reference!r}: not a directory, packaged alias or hub id"
    )


def _is_run(target: Path) -> bool:
    return (target / "bitune_config.json").is_file()


def vllm_plan(loaded: LoadedModel) -> dict[str, Any]:
    """How vLLM serves ``loaded``: its base model, the causal adapter as a LoRA (or none), the connector.

    Raises:
        ValueError: for a run vLLM cannot serve exactly (an adapter that is not a plain LoRA).
    """
    target = Path(loaded.name)
    plan: dict[str, Any] = {"model": base_model_dir(loaded), "lora": None, "connector": False, "rank": None}
    if not _is_run(target):
        return plan
    config = loaded.model.bitune_config
    if config.finetune == "full":
        raise ValueError(
            "vLLM serves LoRA runs; this run is fully fine-tuned (finetune: full): serve it with the built-in engine"
        )
    peft = config.peft_config
    if type(peft).__name__ != "LoraConfig" or getattr(peft, "use_dora", False):
        raise ValueError(
            f"vLLM serves LoRA adapters only; this run's adapters are {type(peft).__name__}"
            f"{' with DoRA' if getattr(peft, 'use_dora', False) else ''} (serve it with the built-in engine)"
        )
    plan.update(lora=str(target / "causal"), rank=int(peft.r), connector=config.variant != "lora")
    if plan["connector"]:
        text = loaded.model.config.get_text_config()
        if getattr(text, "sliding_window", None) or "sliding" in str(
            getattr(text, "layer_types", None) or ""
        ):
            raise ValueError(
                f"{text.model_type} has sliding-window attention layers: vLLM's paged cache of such a layer "
                "keeps only a window, so a whole prompt's mixed cache cannot be handed to it (serve this run "
                "with the built-in engine)"
            )
    return plan


def engine_args(loaded: LoadedModel, dtype: str, max_batch_size: int, options: dict[str, Any]):
    """vLLM's ``EngineArgs`` for ``loaded``: ``options`` (from `parse_vllm_args`) plus what bitune sets."""
    from vllm import EngineArgs

    from .kv_connector import connector_config

    plan = vllm_plan(loaded)
    settings: dict[str, Any] = dict(
        model=plan["model"],
        dtype=dtype,
        enable_prefix_caching=False,
        max_num_seqs=max_batch_size,
        max_model_len=loaded.context_length,
    )
    if plan["lora"]:
        settings.update(enable_lora=True, max_lora_rank=max(8, plan["rank"]), max_loras=1)
    if plan["connector"]:
        settings["kv_transfer_config"] = connector_config(loaded.name, dtype)
    return EngineArgs(**{**settings, **options}), plan


class VllmEngine(Engine):
    """Requests decoded by vLLM's engine (see the module docstring); the interface of `BatchingEngine`."""

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int = 8,
        dtype: str = "float32",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(loaded, max_batch_size)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the connector uses the model loaded here
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.llm_engine import LLMEngine

        from .kv_connector import MODELS

        args, self.plan = engine_args(loaded, dtype, max_batch_size, options or {})
        if self.plan["connector"]:
            if self.connector is not None:  # vLLM keeps one connector per process
                raise RuntimeError("another vLLM engine with a KV connector is running in this process")
            MODELS[loaded.name] = loaded
        self.vllm = LLMEngine.from_engine_args(args)
        self.lora = LoRARequest("causal", 1, self.plan["lora"]) if self.plan["lora"] else None
        self._rows: dict[str, _Row] = {}
        self._next_id = 0

    @property
    def connector(self):
        """The worker side of the `BituneConnector` (None without one): its ``loads`` count the writes."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        return get_kv_transfer_group() if has_kv_transfer_group() else None

    def stop(self) -> None:
        """Finish what was submitted, then shut vLLM down (so that another engine can start here)."""
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

        from .kv_connector import MODELS

        super().stop()
        self.vllm.engine_core.shutdown()
        if self.plan["connector"]:
            ensure_kv_transfer_shutdown()
            MODELS.pop(self.loaded.name, None)

    # ------------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            if not self._rows:  # idle: wait for work
                first = self.requests.get()
                if first is None:
                    return
                self._add([first, *self._take(self.max_batch_size - 1, wait=0.0)])
            elif not self.requests.empty():
                self._add(self._take(self.max_batch_size, wait=0.0))
            if self._closing and not self._rows:
                return
            try:
                outputs = self.vllm.step()
            except Exception as exc:  # a failed step fails its requests, the server keeps serving
                for request_id, row in list(self._rows.items()):
                    self._drop(request_id)
                    self._finish(row.request, Completion(f"{type(exc).__name__}: {exc}", "error", 0))
                continue
            for output in outputs:
                self._take_output(output)
            for request_id, row in list(self._rows.items()):  # a client that went away
                if row.request.cancelled.is_set():
                    self._drop(request_id, abort=True)
                    self._finish(row.request, Completion("", "cancelled", len(row.tokens)))

    def _add(self, requests: list[GenerationRequest]) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        live = self._live(requests)
        if live:
            self.batch_sizes.append(len(live))
            self.joined += len(live) if self._rows else len(live) - 1
        for request in live:
            params = SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                max_tokens=request.max_tokens,
                stop_token_ids=sorted(self.stop_ids),
                logprobs=request.logprobs,
                prompt_logprobs=(request.logprobs or 0) if request.prompt_logprobs else None,
                detokenize=False,
                output_kind=RequestOutputKind.DELTA,
            )
            request_id = str(self._next_id)
            self._next_id += 1
            row = _Row(request)
            self._rows[request_id] = row
            try:
                self.vllm.add_request(
                    request_id, {"prompt_token_ids": list(request.prompt_ids)}, params, lora_request=self.lora
                )
            except Exception as exc:  # e.g. a prompt longer than vLLM's max_model_len
                del self._rows[request_id]
                self._finish(request, Completion(f"{type(exc).__name__}: {exc}", "error", 0))

    def _take_output(self, output) -> None:
        row = self._rows.get(output.request_id)
        if row is None:  # answered already (a stop string), vLLM's last word on it
            return
        if output.prompt_logprobs is not None and row.prompt_logprobs is None:
            row.prompt_logprobs = [
                None if entry is None else _token_logprob(token, entry, row.request.logprobs or 0)
                for token, entry in zip(row.request.prompt_ids, output.prompt_logprobs, strict=True)
            ]
        sequence = output.outputs[0]
        for i, token in enumerate(sequence.token_ids):
            if row.request.logprobs is not None and sequence.logprobs is not None:
                row.logprobs.append(_token_logprob(token, sequence.logprobs[i], row.request.logprobs))
            if self._advance(row, token):
                self._drop(output.request_id, abort=not output.finished)
                return
        if output.finished:  # vLLM ended it without a token that ends it here (e.g. a stop id not kept)
            self._drop(output.request_id)
            self._settle(row, "length" if sequence.finish_reason == "length" else "stop")

    def _drop(self, request_id: str, abort: bool = False) -> None:
        self._rows.pop(request_id, None)
        if abort:
            self.vllm.abort_request([request_id])


def _token_logprob(token: int, entry: dict, top: int) -> TokenLogprob:
    """A vLLM logprobs entry (token -> Logprob with its rank) as the built-in engine's (token, logprob, top)."""
    ranked = sorted(((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None))
    alternatives = tuple((t, logprob) for _, t, logprob in ranked[:top]) if top else ()
    return int(token), float(entry[token].logprob), alternatives
