"""``bitune serve``: an OpenAI-compatible HTTP API over the batching engine (FastAPI + uvicorn, server-sent
events from sse-starlette).

    GET  /health                 no authentication
    GET  /v1/models
    POST /v1/completions         the prompt text verbatim (with the tokenizer's special tokens)
    POST /v1/chat/completions    messages written with the run's prompt format (chat template, or the paper's)

Request fields: ``model``, ``prompt``/``messages``, ``max_tokens``, ``temperature`` (0: greedy), ``top_p``,
``stop``, ``seed``, ``n``, ``stream`` (with ``stream_options.include_usage``: a last chunk with ``usage``);
responses carry ``usage`` and each choice its ``finish_reason``.
Bad requests get a 4xx with an OpenAI error body (``{"error": {"message", "type", "param", "code"}}``) and
the server keeps serving. With an API key (``--api-key`` or ``BITUNE_API_KEY``) every endpoint but
``/health`` needs ``Authorization: Bearer <key>``. A client that goes away mid-stream frees its batch slot.

Longer than most modules here because it is the whole HTTP surface in one place: request schemas, error
bodies, the two endpoints and their streamed form; the batching itself is engine.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.chat import normalize_messages
from ..inference import LoadedModel, prompt_ids
from .engine import BatchingEngine, Completion, GenerationRequest

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class OpenAIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (a list of one string)")
            value = value[0]
        if not value:
            raise ValueError("prompt is empty")
        return value


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


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
    created = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", None
        return OpenAIError(
            400, f"{where}: {message}" if where else message, where, "invalid_request"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        body = {
            "error": {
                "message": f"{type(exc).__name__}: {exc}",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=500)

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
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "bitune"}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_model(body.model, model_name)
        ids = loaded.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
        return await _respond(body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        _check_model(body.model, model_name)
        try:
            messages = list(normalize_messages([m.model_dump() for m in body.messages]))
        except ValueError as exc:
            raise OpenAIError(400, f"messages: {exc}", "messages") from None
        return await _respond(body, prompt_ids(loaded, messages), chat=True)

    async def _respond(body: _Sampling, ids: list[int], chat: bool):
        context = loaded.context_length
        if context and len(ids) >= context:
            raise OpenAIError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {context}",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = (context - len(ids)) if chat and context else DEFAULT_COMPLETION_TOKENS
        if max_tokens <= 0:
            raise OpenAIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if context and len(ids) + max_tokens > context:
            raise OpenAIError(
                400,
                f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed the model's context of {context}",
                "max_tokens",
                "context_length_exceeded",
            )
        strip_space = chat and loaded.prompt_format.template == "paper"  # its answers open with a space
        stream = _Stream(asyncio.get_running_loop(), body, ids, max_tokens, strip_space)
        for sub in stream.requests:
            engine.submit(sub)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            return EventSourceResponse(
                _events(stream, response_id, kind, chat, model_name, created, _wants_usage(body), len(ids)),
                ping=15,
            )
        try:
            results = await stream.results()
        except asyncio.CancelledError:
            stream.cancel()
            raise
        _raise_failures(results)
        choices = [
            {"index": i, "finish_reason": r.finish_reason, "logprobs": None}
            | ({"message": {"role": "assistant", "content": r.text}} if chat else {"text": r.text})
            for i, r in enumerate(results)
        ]
        completion_tokens = sum(r.completion_tokens for r in results)
        return {
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": _usage(len(ids), completion_tokens),
        }

    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise OpenAIError(
            404,
            f"model {name!r} is not served here; this server serves {served!r}",
            "model",
            "model_not_found",
        )


def _wants_usage(body: _Sampling) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _raise_failures(results: list[Completion]) -> None:
    failed = [r for r in results if r.finish_reason == "error"]
    if failed:
        raise OpenAIError(500, f"generation failed: {failed[0].text}")


class _Stream:
    """The n sequences of one API request and the asyncio queue that their text and endings arrive on."""

    def __init__(self, loop, body: _Sampling, ids: list[int], max_tokens: int, strip_space: bool) -> None:
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.strip_space = strip_space
        generator = None
        if body.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(body.seed if body.seed is not None else torch.seed())
        self.requests = [
            GenerationRequest(
                prompt_ids=list(ids),
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=tuple(body.stop or ()),
                generator=generator,
                on_text=self._sender(i, "text"),
                on_done=self._sender(i, "done"),
            )
            for i in range(body.n)
        ]
        self.started = [False] * body.n

    def _sender(self, index: int, kind: str):
        def send(value) -> None:  # called on the engine thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, value))

        return send

    def clean(self, index: int, text: str) -> str:
        if self.strip_space and not self.started[index] and text:
            self.started[index] = True
            return text[1:] if text.startswith(" ") else text
        return text

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled.set()

    async def results(self) -> list[Completion]:
        done: dict[int, Completion] = {}
        while len(done) < len(self.requests):
            index, kind, value = await self.events.get()
            if kind == "done":
                text = value.text[1:] if self.strip_space and value.text.startswith(" ") else value.text
                done[index] = Completion(text, value.finish_reason, value.completion_tokens)
        return [done[i] for i in range(len(self.requests))]


async def _events(
    stream: _Stream,
    response_id: str,
    kind: str,
    chat: bool,
    model: str,
    created: int,
    include_usage: bool,
    prompt_tokens: int,
):
    """The OpenAI chunk stream: role first (chat), then text deltas as they come, a final chunk per choice
    with its finish_reason, with ``include_usage`` a chunk with no choices and the usage, then [DONE].
    A client that disconnects cancels its sequences."""
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def envelope(choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": response_id,
            "object": chunk_kind,
            "created": created,
            "model": model,
            "choices": choices,
        }
        return json.dumps(body | ({"usage": usage} if include_usage else {}))

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        return envelope([choice])

    finished, completion_tokens = 0, 0
    try:
        if chat:
            for index in range(len(stream.requests)):
                yield {"data": chunk(index, None, None, role=True)}
        while finished < len(stream.requests):
            index, kind_, value = await stream.events.get()
            if kind_ == "text":
                text = stream.clean(index, value)
                if text:
                    yield {"data": chunk(index, text, None)}
            else:
                finished += 1
                completion_tokens += value.completion_tokens
                if value.finish_reason == "error":
                    yield {
                        "data": json.dumps(
                            {"error": {"message": f"generation failed: {value.text}", "type": "server_error"}}
                        )
                    }
                    continue
                yield {"data": chunk(index, None, value.finish_reason)}
        if include_usage:
            yield {"data": envelope([], _usage(prompt_tokens, completion_tokens))}
        yield {"data": "[DONE]"}
    finally:
        if finished < len(stream.requests):  # the client went away (or the server is stopping)
            stream.cancel()
