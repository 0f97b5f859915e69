"""Serving a Bitune model over HTTP with an OpenAI-compatible API (``pip install bitune[serve]``).

    bitune serve runs/chat --port 8000                   # or a packaged alias / base model: plain causal

Split as the reference servers are: engine.py batches and decodes (no HTTP), protocol.py holds the typed
requests, responses and chunks, handlers.py one handler per endpoint, errors.py the OpenAI error bodies, and
app.py the routes and authentication. `serve` runs it with uvicorn until SIGTERM or
Ctrl-C, letting requests in flight finish first.
"""

from __future__ import annotations

import os

from ..packages import require_package

API_KEY_ENV = "BITUNE_API_KEY"


def serve(
    target: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 20.0,
    model_name: str | None = None,
    drain_timeout: float = 30.0,
) -> None:
    """Load ``target`` (a run directory, checkpoint, snapshot, hub run id or base model) and serve it.

    Args:
        api_key: required as a bearer token on every endpoint but /health (default: ``$BITUNE_API_KEY``).
        model_name: the id clients pass as ``model`` (default: ``target``).
        drain_timeout: on SIGTERM or Ctrl-C, how long requests in flight may take to finish (seconds);
            those still running then are cancelled and the server exits.
    """
    require_package("fastapi", "pip install 'bitune[serve]'", "bitune serve")
    require_package("uvicorn", "pip install 'bitune[serve]'", "bitune serve")
    import uvicorn
    from sse_starlette.sse import AppStatus

    from ..inference import load_for_inference
    from .app import create_app

    if max_batch_size < 1 or max_wait_ms < 0 or drain_timeout < 0:
        raise ValueError(
            f"max_batch_size must be >= 1, max_wait_ms and drain_timeout >= 0, got {max_batch_size}, "
            f"{max_wait_ms}, {drain_timeout}"
        )
    loaded = load_for_inference(target)
    app = create_app(
        loaded,
        model_name or target,
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
    )
    AppStatus.disable_automatic_graceful_drain()  # streams end with their answers: let them finish on SIGTERM
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=drain_timeout)
