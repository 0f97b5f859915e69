"""Serving a Bitune model over HTTP with an OpenAI-compatible API (``pip install bitune[serve]``).

    bitune serve runs/chat --port 8000                   # or a packaged alias / base model: plain causal

Split as the reference servers are: engine.py batches and decodes (no HTTP), protocol.py holds the typed
requests, responses and chunks, handlers.py one handler per endpoint, errors.py the OpenAI error bodies, and
app.py the routes and authentication. `serve` runs it with uvicorn until SIGTERM or
Ctrl-C, letting requests in flight finish first.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..packages import require_package

API_KEY_ENV = "BITUNE_API_KEY"


def serve(
    target: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 0.0,
    model_name: str | None = None,
    drain_timeout: float = 30.0,
    engine: str = "builtin",
    dtype: str = "float32",
    vllm_args: list[str] | tuple[str, ...] = (),
    prefix_cache_tokens: int | None = None,
) -> None:
    """Load ``target`` (a run directory, checkpoint, snapshot, hub run id or base model) and serve it.

    Args:
        api_key: required as a bearer token on every endpoint but /health (default: ``$BITUNE_API_KEY``).
        model_name: the id clients pass as ``model`` (default: ``target``).
        drain_timeout: on SIGTERM or Ctrl-C, how long requests in flight may take to finish (seconds);
            those still running then are cancelled and the server exits.
        engine: ``builtin`` (bitune's batching engine) or ``vllm`` (`bitune.serving.vllm_engine`).
        dtype: the weights' (and cache's) dtype.
        vllm_args: vLLM's own engine options, as on its command line (``--max-model-len 4096``).
        prefix_cache_tokens: how many prompt tokens' causal keys and values the built-in engine keeps for
            the shared prefixes of later prompts (`bitune.method.prefixes`; default 2048, 0: none).

    Raises:
        ValueError: for bad options, or a model or option that vLLM cannot serve exactly (before loading).
    """
    require_package("fastapi", "pip install 'bitune[serve]'", "bitune serve")
    require_package("uvicorn", "pip install 'bitune[serve]'", "bitune serve")
    import uvicorn
    from sse_starlette.sse import AppStatus

    from ..inference import load_for_inference
    from .app import create_app

    if vllm_args and engine != "vllm":
        raise ValueError(f"vLLM options {list(vllm_args)} need --engine vllm")
    if prefix_cache_tokens is not None and engine == "vllm":
        raise ValueError(
            "--prefix-cache-tokens sets the built-in engine's causal prefix cache; on --engine vllm prefix "
            "caching stays off (a cached causal prefix would stand in for the mixed one)"
        )
    prefix_cache_tokens = 2048 if prefix_cache_tokens is None else prefix_cache_tokens
    if max_batch_size < 1 or max_wait_ms < 0 or drain_timeout < 0 or prefix_cache_tokens < 0:
        raise ValueError(
            f"max_batch_size must be >= 1, max_wait_ms, drain_timeout and prefix_cache_tokens >= 0, got "
            f"{max_batch_size}, {max_wait_ms}, {drain_timeout}, {prefix_cache_tokens}"
        )
    if engine not in ("builtin", "vllm"):
        raise ValueError(f"engine must be 'builtin' or 'vllm', got {engine!r}")
    options = {}
    if engine == "vllm":
        require_package("vllm", "make setup-vllm (README 'Serving on vLLM')", "bitune serve --engine vllm")
        from .vllm_engine import parse_vllm_args

        options = parse_vllm_args(vllm_args)  # bad or clashing options fail before anything loads
    loaded = in_passing_thread(load_for_inference, target, dtype=getattr(torch, dtype))
    decoder = None
    if engine == "vllm":
        from .vllm_engine import VllmEngine

        decoder = VllmEngine(loaded, max_batch_size=max_batch_size, dtype=dtype, options=options)
    app = create_app(
        loaded,
        model_name or target,
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        engine=decoder,
        prefix_cache_tokens=prefix_cache_tokens,
    )
    AppStatus.disable_automatic_graceful_drain()  # streams end with their answers: let them finish on SIGTERM
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_timeout)


def in_passing_thread(function, *args, **kwargs):
    """``function(*args, **kwargs)`` run in a thread that ends when it returns (its exception re-raised).

    The server loads its model this way so that the engine's worker thread is the only one in the process
    that ever ran a parallel torch operation. On CPU each such thread keeps its own OpenMP team for life, and
    once a process has more OpenMP threads than cores, GNU OpenMP stops spin-waiting between parallel
    regions: a decoding step in the worker thread then took 68 ms instead of 44 ms on 2 cores (SmolLM2-135M,
    benchmarks/engine_thread.py) when the main thread had loaded the model. A thread that ends takes its team
    with it.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitune-load") as pool:
        return pool.submit(function, *args, **kwargs).result()
