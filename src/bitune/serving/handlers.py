"""The two generating endpoints, one handler each: ``/v1/completions`` (the prompt text or token ids
verbatim) and ``/v1/chat/completions`` (messages written with the run's prompt format).

Both write the prompt off the event loop (a huge prompt never stalls other streams; one certainly longer than
the context is refused without tokenizing it), check it against the context, submit its ``n`` sequences to the
batching engine and answer at once or as a stream of OpenAI chunks (server-sent events ending with ``[DONE]``);
a client that goes away, streamed or not, cancels its sequences. Log-probabilities come from the fp32 logits
the sampler reads. What differs between the endpoints, the prompt and the shapes of choices, chunks and
log-probabilities, is each handler's own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from functools import cached_property
from typing import NamedTuple

import torch
from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from ..data.chat import normalize_messages
from ..inference import LoadedModel, clean_answer, prompt_ids
from .engine import BatchingEngine, Completion, GenerationRequest, TokenLogprob
from .errors import OpenAIError
from .protocol import (
    DEFAULT_COMPLETION_TOKENS,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingRequest,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)

ECHO_REFUSED = (
    "echo: a Bitune run reads the whole prompt bidirectionally, so a prompt token's log-probability would have "
    "seen the tokens after it (a continuation sent inside the prompt, as lm-eval's local-completions does, "
    "would leak into its own score); score with `bitune eval` (or `bitune-lm-eval --model bitune`), which "
    "keeps context and continuation apart"
)


class Reply(NamedTuple):
    """The id and creation time that every part of one response carries."""

    id: str
    created: int


class Sequences:
    """The sequences of one request (``n`` per prompt), submitted to the engine, and the asyncio queue on
    which their text and endings arrive (the engine calls back from its own thread)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        body: SamplingRequest,
        prompts: list[list[int]],
        max_tokens: list[int],
        logprobs: int | None,
        prompt_logprobs: bool,
    ) -> None:
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        generator = None
        if body.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(body.seed if body.seed is not None else torch.seed())
        self.prompts = prompts
        self.requests = [
            GenerationRequest(
                prompt_ids=list(ids),
                max_tokens=limit,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=tuple(body.stop or ()),
                generator=generator,  # one generator for the request: its samples differ, seeded alike
                seed=None if body.seed is None else body.seed + p * body.n + j,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                on_text=self._sender(p * body.n + j, "text"),  # the choice's index: prompt * n + sample
                on_done=self._sender(p * body.n + j, "done"),
            )
            for p, (ids, limit) in enumerate(zip(prompts, max_tokens, strict=True))
            for j in range(body.n)
        ]
        self.n = body.n
        self.echo = bool(getattr(body, "echo", False))

    def _sender(self, index: int, kind: str):
        def send(*value) -> None:  # called on the engine thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, kind, value))

        return send

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.n]

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled.set()

    async def completions(self) -> list[Completion]:
        """Every sequence's `Completion`, in order, once all have ended."""
        done: dict[int, Completion] = {}
        while len(done) < len(self.requests):
            index, kind, value = await self.events.get()
            if kind == "done":
                done[index] = value[0]
        return [done[i] for i in range(len(self.requests))]


class Handler:
    """What both endpoints share; subclasses give the prompts and the shapes of choices and chunks."""

    prompt_field: str  # the request field a too-long prompt is blamed on
    id_prefix: str

    def __init__(self, loaded: LoadedModel, engine: BatchingEngine, model_name: str) -> None:
        self.loaded, self.engine, self.model_name = loaded, engine, model_name

    # ---------------------------------------------------------------------------- what subclasses give
    def prompts(self, body) -> list[list[int]]:
        raise NotImplementedError

    def logprobs(self, body) -> int | None:
        """How many alternatives each token's log-probability comes with (None: no log-probabilities)."""
        return None

    def prompt_logprobs(self, body) -> bool:
        return False

    def default_max_tokens(self, prompt_tokens: int) -> int:
        return DEFAULT_COMPLETION_TOKENS

    def clean(self, text: str) -> str:
        """An answer's text as the client sees it (the start of its first piece when streamed)."""
        return text

    def response(self, reply: Reply, sequences: Sequences, completions: list[Completion], usage: Usage):
        raise NotImplementedError

    def chunk(self, reply: Reply, index: int, text: str | None, finish_reason: str | None, logprobs: list):
        raise NotImplementedError

    def opening_chunks(self, reply: Reply, sequences: Sequences) -> list:
        return []

    # ------------------------------------------------------------------------------------ the endpoint
    async def __call__(self, body: SamplingRequest, request: Request):
        if body.model != self.model_name:
            raise OpenAIError(
                404,
                f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        prompts = await asyncio.to_thread(
            self.prompts, body
        )  # tokenizing a long prompt must not stall others
        limits = [self._max_tokens(body, len(ids)) for ids in prompts]
        sequences = Sequences(
            asyncio.get_running_loop(), body, prompts, limits, self.logprobs(body), self.prompt_logprobs(body)
        )
        for sequence in sequences.requests:
            self.engine.submit(sequence)
        reply = Reply(f"{self.id_prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            events = self._events(sequences, reply, body.include_usage, prompt_tokens)
            return EventSourceResponse(events, ping=15)
        finished = asyncio.ensure_future(sequences.completions())
        try:
            while not finished.done():  # a client that hangs up cancels its sequences, streamed or not
                await asyncio.wait({finished}, timeout=0.25)
                if not finished.done() and await request.is_disconnected():
                    sequences.cancel()
            completions = finished.result()
        except asyncio.CancelledError:
            sequences.cancel()
            raise
        failed = [c for c in completions if c.finish_reason == "error"]
        if failed:
            raise OpenAIError(500, f"generation failed: {failed[0].text}")
        usage = Usage.of(prompt_tokens, sum(c.completion_tokens for c in completions))
        return self.response(reply, sequences, completions, usage)

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
            body.token_limit if body.token_limit is not None else self.default_max_tokens(prompt_tokens)
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

    def check_length(self, text: str) -> None:
        """Refuse, without tokenizing it, a text that cannot fit the context (even at the tokenizer's longest
        token per position)."""
        context = self.loaded.context_length
        if context and len(text) > context * self._longest_token:
            raise OpenAIError(
                400,
                f"the prompt has {len(text)} characters, more than the model's context of {context} tokens can hold",
                self.prompt_field,
                "context_length_exceeded",
            )

    @cached_property
    def _longest_token(self) -> int:
        vocabulary = self.loaded.tokenizer.get_vocab()
        return max(8, max(len(token) for token in vocabulary))

    def token_text(self, token: int) -> str:
        return self.loaded.tokenizer.decode([token])

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
            for chunk in self.opening_chunks(reply, sequences):
                yield data(chunk)
            while finished < len(sequences.requests):
                index, kind, value = await sequences.events.get()
                if kind == "text":
                    piece, logprobs = value
                    text = piece if started[index] else self.clean(piece)
                    started[index] = started[index] or bool(piece)
                    if text or logprobs:
                        yield data(self.chunk(reply, index, text, None, logprobs))
                    continue
                (completion,) = value
                finished += 1
                completion_tokens += completion.completion_tokens
                if completion.finish_reason == "error":
                    error = OpenAIError(500, f"generation failed: {completion.text}").body()
                    yield {"data": error.model_dump_json()}
                    continue
                yield data(self.chunk(reply, index, None, completion.finish_reason, []))
            if include_usage:
                usage = self.chunk(reply, 0, None, None, []).model_copy(
                    update={"choices": [], "usage": Usage.of(prompt_tokens, completion_tokens)}
                )
                yield data(usage)
            yield {"data": "[DONE]"}
        finally:
            if finished < len(sequences.requests):  # the client went away (or the server is stopping)
                sequences.cancel()


class CompletionsHandler(Handler):
    """``POST /v1/completions``: each prompt verbatim (text with the tokenizer's special tokens, or token ids);
    ``echo`` puts the prompt before the answer and, with ``logprobs``, scores its tokens (a base model or a
    LoRA run only: a Bitune run is refused, see `ECHO_REFUSED`)."""

    prompt_field = "prompt"
    id_prefix = "cmpl"

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        if body.echo and self.loaded.model.bitune_config.variant != "lora":
            raise OpenAIError(400, ECHO_REFUSED, "echo", "echo_not_supported")
        prompts = []
        for prompt in body.prompt:
            if isinstance(prompt, str):
                self.check_length(prompt)
                prompt = self.loaded.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            elif any(not 0 <= t < len(self.loaded.tokenizer) for t in prompt):
                raise OpenAIError(
                    400,
                    f"prompt holds token ids outside the vocabulary of {len(self.loaded.tokenizer)}",
                    "prompt",
                )
            prompts.append(list(prompt))
        return prompts

    def logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    def prompt_logprobs(self, body: CompletionRequest) -> bool:
        return body.echo and body.logprobs is not None

    def response(self, reply, sequences, completions, usage) -> CompletionResponse:
        choices = []
        for index, completion in enumerate(completions):
            prompt = sequences.prompt_of(index)
            echoed = self.loaded.tokenizer.decode(prompt) if sequences.echo else ""
            logprobs = None
            if completion.logprobs is not None:
                entries = (completion.prompt_logprobs or []) + completion.logprobs
                tokens = (prompt if completion.prompt_logprobs else []) + [e[0] for e in completion.logprobs]
                logprobs = self._legacy_logprobs(tokens, entries)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echoed + completion.text,
                    finish_reason=completion.finish_reason,
                    logprobs=logprobs,
                )
            )
        return CompletionResponse(
            id=reply.id, created=reply.created, model=self.model_name, choices=choices, usage=usage
        )

    def _legacy_logprobs(
        self, tokens: list[int], entries: list[TokenLogprob | None], offset: int = 0
    ) -> CompletionLogprobs:
        texts = [self.token_text(t) for t in tokens]
        offsets, position = [], offset
        for text in texts:
            offsets.append(position)
            position += len(text)
        return CompletionLogprobs(
            tokens=texts,
            token_logprobs=[None if e is None else e[1] for e in entries],
            top_logprobs=[None if e is None else {self.token_text(t): lp for t, lp in e[2]} for e in entries],
            text_offset=offsets,
        )

    def chunk(self, reply, index, text, finish_reason, logprobs) -> CompletionChunk:
        legacy = self._legacy_logprobs([e[0] for e in logprobs], logprobs) if logprobs else None
        choice = CompletionChoice(index=index, text=text or "", finish_reason=finish_reason, logprobs=legacy)
        return CompletionChunk(id=reply.id, created=reply.created, model=self.model_name, choices=[choice])


class ChatCompletionsHandler(Handler):
    """``POST /v1/chat/completions``: the messages written with the run's recorded prompt format."""

    prompt_field = "messages"
    id_prefix = "chatcmpl"

    def prompts(self, body: ChatCompletionRequest) -> list[list[int]]:
        for message in body.messages:
            self.check_length(message.as_message()["content"])
        try:
            messages = list(normalize_messages([m.as_message() for m in body.messages]))
            return [prompt_ids(self.loaded, messages)]
        except ValueError as exc:
            raise OpenAIError(400, f"messages: {exc}", "messages") from None

    def logprobs(self, body: ChatCompletionRequest) -> int | None:
        return (body.top_logprobs or 0) if body.logprobs else None

    def default_max_tokens(self, prompt_tokens: int) -> int:
        context = self.loaded.context_length
        return context - prompt_tokens if context else DEFAULT_COMPLETION_TOKENS

    def clean(self, text: str) -> str:
        return clean_answer(self.loaded, text)

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        def top(token: int, logprob: float) -> TopLogprob:
            text = self.token_text(token)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        return ChatLogprobs(
            content=[
                TokenLogprobEntry(
                    **top(t, lp).model_dump(), top_logprobs=[top(a, alp) for a, alp in alternatives]
                )
                for t, lp, alternatives in entries
            ]
        )

    def response(self, reply, sequences, completions, usage) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=self.clean(c.text)),
                finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else self._chat_logprobs(c.logprobs),
            )
            for i, c in enumerate(completions)
        ]
        return ChatCompletionResponse(
            id=reply.id, created=reply.created, model=self.model_name, choices=choices, usage=usage
        )

    def chunk(self, reply, index, text, finish_reason, logprobs) -> ChatCompletionChunk:
        choice = ChatChunkChoice(
            index=index,
            delta=DeltaMessage(content=text),
            finish_reason=finish_reason,
            logprobs=self._chat_logprobs(logprobs) if logprobs else None,
        )
        return ChatCompletionChunk(
            id=reply.id, created=reply.created, model=self.model_name, choices=[choice]
        )

    def opening_chunks(self, reply, sequences) -> list[ChatCompletionChunk]:
        """The assistant's role first, for every choice."""
        return [
            ChatCompletionChunk(
                id=reply.id,
                created=reply.created,
                model=self.model_name,
                choices=[ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
            )
            for i in range(len(sequences.requests))
        ]
