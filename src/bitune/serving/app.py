"""``bitune serve``'s HTTP application: the routes, authentication and the engine's lifetime (FastAPI).

    GET  /health                 no authentication
    GET  /v1/models
    POST /v1/completions         the prompt text verbatim (with the tokenizer's special tokens)
    POST /v1/chat/completions    messages written with the run's prompt format (chat template, or the paper's)

Request fields: ``model``, ``prompt``/``messages``, ``max_tokens``, ``temperature`` (0: greedy), ``top_p``,
``stop``, ``seed``, ``n``, ``stream`` (with ``stream_options.include_usage``: a last chunk with ``usage``);
responses carry ``usage`` and each choice its ``finish_reason``. The endpoints' work is handlers.py, the
request and response models protocol.py, error bodies errors.py, batching and decoding engine.py. With an
API key (``--api-key`` or ``BITUNE_API_KEY``) every endpoint but ``/health`` needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import secrets
import time

from fastapi import FastAPI, Request

from ..inference import LoadedModel
from .engine import BatchingEngine
from .errors import OpenAIError, install_error_handlers
from .handlers import ChatCompletionsHandler, CompletionsHandler
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList


def create_app(
    loaded: LoadedModel,
    model_name: str,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 20.0,
) -> FastAPI:
    """The FastAPI application serving ``loaded`` under ``model_name`` (see the module docstring)."""
    engine = BatchingEngine(loaded, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()  # after uvicorn stopped taking requests and finished the ones in flight

    app = FastAPI(title="bitune", lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    created = int(time.time())
    complete = CompletionsHandler(loaded, engine, model_name)
    chat = ChatCompletionsHandler(loaded, engine, model_name)

    @app.middleware("http")
    async def _authenticate(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return OpenAIError(
                    401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key"
                ).response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await complete(body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await chat(body)

    return app
