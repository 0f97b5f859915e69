"""The two generating endpoints, one handler each: ``/v1/completions`` (the prompt text verbatim) and
``/v1/chat/completions`` (messages written with the run's prompt format).

Both check the request against the model's context, submit its ``n`` sequences to the batching engine and
answer either at once or as a stream of OpenAI chunks (server-sent events ending with ``[DONE]``). What
differs between them, the prompt and the shape of a choice and a chunk, is each handler's own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import NamedTuple

import torch
from sse_starlette.sse import EventSourceResponse

from ..data.chat import normalize_messages
from ..inference import LoadedModel, clean_answer, prompt_ids
from .engine import BatchingEngine, Completion, GenerationRequest
from .errors import OpenAIError
from .protocol import (
    DEFAULT_COMPLETION_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingRequest,
    Usage,
)


class Reply(NamedTuple):
    """The id and creation time that every part of one response carries."""

    id: str
    created: int


class Sequences:
    """The ``n`` sequences of one request, submitted to the engine, and the asyncio queue on which their text
    and endings arrive (the engine calls back from its own thread)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, body: SamplingRequest, ids: list[int], max_tokens: int
    ):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
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
                generator=generator,  # one generator for the request: its n samples differ, seeded alike
                on_text=self._sender(i, "text"),
                on_done=self._sender(i, "done"),
            )
            for i in range(body.n)
        ]

    def _sender(self, index: int, kind: str):
        def send(value) -> None:  # called on the engine thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, value))

        return send

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled.set()

    async def completions(self) -> list[Completion]:
        """Every sequence's `Completion`, in order, once all have ended."""
        done: dict[int, Completion] = {}
        while len(done) < len(self.requests):
            index, kind, value = await self.events.get()
            if kind == "done":
                done[index] = value
        return [done[i] for i in range(len(self.requests))]


class Handler:
    """What both endpoints share; subclasses give the prompt and the shapes of choices and chunks."""

    prompt_field: str  # the request field a too-long prompt is blamed on
    id_prefix: str

    def __init__(self, loaded: LoadedModel, engine: BatchingEngine, model_name: str) -> None:
        self.loaded, self.engine, self.model_name = loaded, engine, model_name

    # ---------------------------------------------------------------------------- what subclasses give
    def prompt(self, body) -> list[int]:
        raise NotImplementedError

    def default_max_tokens(self, prompt_tokens: int) -> int:
        return DEFAULT_COMPLETION_TOKENS

    def clean(self, text: str) -> str:
        """An answer's text as the client sees it (the start of its first piece when streamed)."""
        return text

    def response(self, reply: Reply, completions: list[Completion], usage: Usage):
        raise NotImplementedError

    def chunk(self, reply: Reply, index: int, text: str | None, finish_reason: str | None):
        raise NotImplementedError

    def opening_chunks(self, reply: Reply, n: int) -> list:
        return []

    # ------------------------------------------------------------------------------------ the endpoint
    async def __call__(self, body: SamplingRequest):
        if body.model != self.model_name:
            raise OpenAIError(
                404,
                f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        ids = self.prompt(body)
        max_tokens = self._max_tokens(body, len(ids))
        sequences = Sequences(asyncio.get_running_loop(), body, ids, max_tokens)
        for request in sequences.requests:
            self.engine.submit(request)
        reply = Reply(f"{self.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))
        if body.stream:
            events = self._events(sequences, reply, body.include_usage, len(ids))
            return EventSourceResponse(events, ping=15)
        try:
            completions = await sequences.completions()
        except asyncio.CancelledError:
            sequences.cancel()
            raise
        failed = [c for c in completions if c.finish_reason == "error"]
        if failed:
            raise OpenAIError(500, f"generation failed: {failed[0].text}")
        completions = [
            Completion(self.clean(c.text), c.finish_reason, c.completion_tokens) for c in completions
        ]
        usage = Usage.of(len(ids), sum(c.completion_tokens for c in completions))
        return self.response(reply, completions, usage)

    def _max_tokens(self, body: SamplingRequest, prompt_tokens: int) -> int:
        context = self.loaded.context_length
        if context and prompt_tokens >= context:
            raise OpenAIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
                self.prompt_field,
                "context_length_exceeded",
            )
        max_tokens = (
            body.max_tokens if body.max_tokens is not None else self.default_max_tokens(prompt_tokens)
        )
        if max_tokens <= 0:
            raise OpenAIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if context and prompt_tokens + max_tokens > context:
            raise OpenAIError(
                400,
                f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) exceed the model's context "
                f"of {context}",
                "max_tokens",
                "context_length_exceeded",
            )
        return max_tokens

    async def _events(
        self, sequences: Sequences, reply: Reply, include_usage: bool, prompt_tokens: int
    ) -> AsyncIterator[dict]:
        """The chunk stream: opening chunks, text deltas as they come, a final chunk per choice with its
        finish_reason, with ``include_usage`` a chunk with no choices and the usage, then [DONE]. A client
        that disconnects cancels its sequences."""

        def data(chunk) -> dict:
            return {"data": chunk.model_dump_json(exclude=None if include_usage else {"usage"})}

        started = [False] * len(sequences.requests)
        finished, completion_tokens = 0, 0
        try:
            for chunk in self.opening_chunks(reply, len(sequences.requests)):
                yield data(chunk)
            while finished < len(sequences.requests):
                index, kind, value = await sequences.events.get()
                if kind == "text":
                    text = value if started[index] else self.clean(value)
                    started[index] = started[index] or bool(value)
                    if text:
                        yield data(self.chunk(reply, index, text, None))
                    continue
                finished += 1
                completion_tokens += value.completion_tokens
                if value.finish_reason == "error":
                    error = OpenAIError(500, f"generation failed: {value.text}").body()
                    yield {"data": error.model_dump_json()}
                    continue
                yield data(self.chunk(reply, index, None, value.finish_reason))
            if include_usage:
                usage = self.chunk(reply, 0, None, None).model_copy(
                    update={"choices": [], "usage": Usage.of(prompt_tokens, completion_tokens)}
                )
                yield data(usage)
            yield {"data": "[DONE]"}
        finally:
            if finished < len(sequences.requests):  # the client went away (or the server is stopping)
                sequences.cancel()


class CompletionsHandler(Handler):
    """``POST /v1/completions``: the prompt text verbatim (with the tokenizer's special tokens)."""

    prompt_field = "prompt"
    id_prefix = "cmpl"

    def prompt(self, body: CompletionRequest) -> list[int]:
        return self.loaded.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]

    def response(self, reply: Reply, completions: list[Completion], usage: Usage) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ]
        return CompletionResponse(
            id=reply.id, created=reply.created, model=self.model_name, choices=choices, usage=usage
        )

    def chunk(self, reply: Reply, index: int, text: str | None, finish_reason: str | None) -> CompletionChunk:
        choice = CompletionChoice(index=index, text=text or "", finish_reason=finish_reason)
        return CompletionChunk(id=reply.id, created=reply.created, model=self.model_name, choices=[choice])


class ChatCompletionsHandler(Handler):
    """``POST /v1/chat/completions``: the messages written with the run's recorded prompt format."""

    prompt_field = "messages"
    id_prefix = "chatcmpl"

    def prompt(self, body: ChatCompletionRequest) -> list[int]:
        try:
            messages = list(normalize_messages([m.model_dump() for m in body.messages]))
        except ValueError as exc:
            raise OpenAIError(400, f"messages: {exc}", "messages") from None
        return prompt_ids(self.loaded, messages)

    def default_max_tokens(self, prompt_tokens: int) -> int:
        context = self.loaded.context_length
        return context - prompt_tokens if context else DEFAULT_COMPLETION_TOKENS

    def clean(self, text: str) -> str:
        return clean_answer(self.loaded, text)

    def response(self, reply: Reply, completions: list[Completion], usage: Usage) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ]
        return ChatCompletionResponse(
            id=reply.id, created=reply.created, model=self.model_name, choices=choices, usage=usage
        )

    def chunk(
        self, reply: Reply, index: int, text: str | None, finish_reason: str | None
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionChunk(
            id=reply.id, created=reply.created, model=self.model_name, choices=[choice]
        )

    def opening_chunks(self, reply: Reply, n: int) -> list[ChatCompletionChunk]:
        """The assistant's role first, for every choice."""
        return [
            ChatCompletionChunk(
                id=reply.id,
                created=reply.created,
                model=self.model_name,
                choices=[ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
            )
            for i in range(n)
        ]
