"""``bitune serve``'s HTTP application: the routes, authentication and the engine's lifetime (FastAPI).

    GET  /health                 no authentication
    GET  /v1/models
    POST /v1/completions         the prompt text or token ids verbatim (text with the tokenizer's special tokens)
    POST /v1/chat/completions    messages written with the run's prompt format (chat template, or the paper's)
    POST /tokenize, /detokenize  vLLM's shapes; GET /tokenizer_info for lm-eval's remote tokenizer

Request fields: ``model``, ``prompt``/``messages``, ``max_tokens``, ``temperature`` (0: greedy), ``top_p``,
``stop``, ``seed``, ``n``, ``stream`` (with ``stream_options.include_usage``: a last chunk with ``usage``);
responses carry ``usage`` and each choice its ``finish_reason``. The endpoints' work is handlers.py, the
request and response models protocol.py, error bodies errors.py, batching and decoding engine.py. With an
API key (``--api-key`` or ``BITUNE_API_KEY``) every endpoint but ``/health`` needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi import Depends, FastAPI, Request

from ..data.chat import normalize_messages
from ..inference import LoadedModel, prompt_ids
from .engine import BatchingEngine, Engine
from .errors import OpenAIError, install_error_handlers
from .handlers import ChatCompletionsHandler, CompletionsHandler
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)


def create_app(
    loaded: LoadedModel,
    model_name: str,
    api_key: str | None = None,
    max_batch_size: int = 8,
    max_wait_ms: float = 0.0,
    engine: Engine | None = None,
    prefix_cache_tokens: int = 2048,
) -> FastAPI:
    """The FastAPI application serving ``loaded`` under ``model_name`` (see the module docstring), decoded
    by ``engine`` (default: a `BatchingEngine` of ``max_batch_size``, ``max_wait_ms`` and
    ``prefix_cache_tokens``)."""
    engine = engine or BatchingEngine(
        loaded,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        prefix_cache_tokens=prefix_cache_tokens,
    )

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()  # after uvicorn stopped taking requests and finished the ones in flight

    async def authenticate(request: Request) -> None:
        """A dependency, not an HTTP middleware: Starlette's middleware would hide a client's disconnect."""
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise OpenAIError(
                    401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key"
                )

    app = FastAPI(title="bitune", lifespan=lifespan, dependencies=[Depends(authenticate)])
    app.state.engine = engine
    install_error_handlers(app)
    created = int(time.time())
    tokenizer = loaded.tokenizer
    complete = CompletionsHandler(loaded, engine, model_name)
    chat = ChatCompletionsHandler(loaded, engine, model_name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.stats()}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        _check_model(body.model, model_name)
        if body.messages is not None:
            try:
                messages = list(normalize_messages([m.as_message() for m in body.messages]))
            except ValueError as exc:
                raise OpenAIError(400, f"messages: {exc}", "messages") from None
            tokens = await asyncio.to_thread(prompt_ids, loaded, messages)
        else:
            complete.check_length(body.prompt)
            tokens = (
                await asyncio.to_thread(tokenizer, body.prompt, add_special_tokens=body.add_special_tokens)
            )["input_ids"]
        strings = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return TokenizeResponse(
            count=len(tokens), max_model_len=loaded.context_length, tokens=tokens, token_strs=strings
        )

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        _check_model(body.model, model_name)
        if any(not 0 <= t < len(tokenizer) for t in body.tokens):
            raise OpenAIError(400, f"tokens outside the vocabulary of {len(tokenizer)}", "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> TokenizerInfo:
        chat_template = (
            loaded.prompt_format.chat_template if loaded.prompt_format.template == "chat" else None
        )
        return TokenizerInfo(
            eos_token=tokenizer.eos_token,
            bos_token=tokenizer.bos_token,
            pad_token=tokenizer.pad_token,
            chat_template=chat_template,
            model_max_length=loaded.context_length,
            tokenizer_class=type(tokenizer).__name__,
        )

    return app


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise OpenAIError(
            404,
            f"model {name!r} is not served here; this server serves {served!r}",
            "model",
            "model_not_found",
        )
