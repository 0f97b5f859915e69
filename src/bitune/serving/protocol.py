"""The OpenAI API as ``bitune serve`` speaks it: typed requests, responses, streamed chunks and error bodies
(pydantic models, validated on the way in and serialised on the way out)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


# -------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


# Fields of the OpenAI API that this server accepts but cannot honour beyond their neutral value: a request
# that sets one otherwise is refused, naming it (never ignored silently).
_NEUTRAL = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
_WHY = {
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "best_of": "best_of is not supported (use n)",
    "suffix": "suffix (insertion) is not supported",
}


class SamplingRequest(BaseModel):
    """The fields both endpoints take. Unknown fields are refused with their names."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens (LangChain sends it)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the end user's id: accepted, not used
    frequency_penalty: float = 0
    presence_penalty: float = 0
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _honoured(self):
        unknown = sorted(self.model_extra or {})
        if unknown:
            raise ValueError(f"unknown fields {unknown}: this server does not take them")
        for name, neutral in _NEUTRAL.items():
            value = getattr(self, name, None)
            if value not in neutral:
                raise ValueError(
                    f"{name}: {_WHY.get(name, f'only {neutral[-1]!r} is supported')}, got {value!r}"
                )
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError(
                f"response_format: only {{'type': 'text'}} is supported, got {self.response_format!r}"
            )
        given = {v for v in (self.max_tokens, self.max_completion_tokens) if v is not None}
        if len(given) > 1:
            raise ValueError("max_tokens and max_completion_tokens differ; give one")
        return self

    @property
    def token_limit(self) -> int | None:
        """max_tokens or max_completion_tokens, whichever is given."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    """``prompt``: a text or token ids, or a list of several (each answered with its own ``n`` choices)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        prompts = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt is empty")
        if len(prompts) > 16:
            raise ValueError("at most 16 prompts per request")
        for prompt in prompts:
            if isinstance(prompt, str):
                try:
                    prompt.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("prompt is not valid Unicode text (a lone surrogate)") from None
        return prompts


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A message as OpenAI clients send it: content as text or a list of text parts; ``developer`` is a
    system message. Tool messages and tool calls are refused (the server has no tools)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _plain(self):
        if self.role == "tool" or self.tool_calls or self.tool_call_id:
            raise ValueError("tool messages and tool calls are not supported (this server has no tools)")
        if self.content is None:
            raise ValueError("content is null (only meaningful with tool calls, which are not supported)")
        return self

    def as_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a ``prompt`` text, or ``messages`` written with the served prompt format."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------------------------- responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per token (``None`` for a prompt's first token)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """A streamed piece of the assistant's message: only the keys that are present are sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# streamed completions have the shape of a whole response (OpenAI: object "text_completion" for both)
CompletionChunk = CompletionResponse


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bitune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What lm-eval's remote tokenizer reads (``GET /tokenizer_info``)."""

    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int | None
    tokenizer_class: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
