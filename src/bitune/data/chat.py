"""Conversations and how a run writes prompts: the paper's template, the model's chat template, or raw text.

A `PromptFormat` says how text becomes a prompt and an answer, for training rows and later for everything
that prompts the trained model (generation, chat, evaluation, a server); the run directory records it
(``prompt_format.json``) so all of them format prompts exactly as training did:

- ``paper``: ``Question: {instruction}\\n\\nAnswer:`` and the answer `` {completion}<EOS>`` (appendix 6.5);
- ``chat``: the tokenizer's chat template. The prompt is the conversation up to the assistant turn being
  trained, rendered with ``add_generation_prompt=True``; the answer is exactly the text the template
  renders for that turn (content and end-of-turn marker), found as the difference of two renderings:
  nothing is guessed and nothing appended. A conversation whose rendering does not start with the
  rendering of its history is skipped (some templates rewrite earlier turns);
- ``raw``: a prompt/completion row verbatim, the completion followed by the EOS token (TRL's standard
  prompt-completion format; an EOS already at the end of the completion is not doubled).

With ``repeat: N`` (prompt repetition, Leviathan, Kalman, Matias 2025) the question being asked is sent N times:
with the paper's template the question part of the prompt (`bitune.data.templates.repeat_question`), with a
chat template the content of the last user message (blank-line separated); a raw prompt is never rewritten.

With ``turns: last`` a conversation gives one row: its final assistant turn, with the whole history as
the prompt (read twice by Bitune, causally and bidirectionally); with ``turns: all`` one row per assistant
turn, each with the history before it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from transformers import PreTrainedTokenizerBase

from .encoding import Rendered, check_content, encode, mark, with_content_spans
from .templates import instruction_prompt, repeat_question

TEMPLATES = ("paper", "chat", "raw")
TURNS = ("last", "all")
ROLES = ("system", "user", "assistant")
PROMPT_FORMAT_NAME = "prompt_format.json"


class Message(TypedDict):
    """One message of a conversation, as chat templates and the OpenAI API write it. The one shape that
    data, inference, serving and TRL pass around (room for more keys, e.g. tool calls, later)."""

    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Conversation:
    """Messages in order, ending with an assistant turn."""

    messages: tuple[Message, ...]
    id: str | None = None

    def __post_init__(self) -> None:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise ValueError("a conversation must end with an assistant message")

    @property
    def assistant_turns(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]

    @property
    def is_single_turn(self) -> bool:
        return len(self.assistant_turns) == 1 and sum(m["role"] == "user" for m in self.messages) == 1


def normalize_messages(messages: Any) -> tuple[Message, ...]:
    """Messages as plain `Message` dicts (only ``role`` and ``content``); raises ValueError naming what is
    wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages are not a non-empty list")
    normalized = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError("a message is not an object with string 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {ROLES})")
        try:
            message["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a message is not valid Unicode text (a lone surrogate)") from None
        normalized.append(Message(role=role, content=message["content"]))
    if not any(m["role"] == "user" and m["content"].strip() for m in normalized):
        raise ValueError("no non-empty user message")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in normalized):
        raise ValueError("an empty assistant message")
    return tuple(normalized)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass(frozen=True)
class PromptFormat:
    """How a run writes prompts (see the module docstring); saved in the run directory."""

    template: str = "paper"
    turns: str = "last"
    chat_template: str | None = field(default=None, repr=False)  # the chat template the run trained with
    repeat: int = 1  # how many times the question being asked is sent (prompt repetition)

    def __post_init__(self) -> None:
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or self.repeat < 1:
            raise ValueError(f"repeat must be a whole number >= 1, got {self.repeat!r}")
        if self.repeat > 1 and self.template == "raw":
            raise ValueError(
                "a raw prompt is used verbatim: prompt repetition needs the paper or chat template"
            )
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.turns not in TURNS:
            raise ValueError(f"turns must be one of {TURNS}, got {self.turns!r}")
        if self.template == "chat" and not self.chat_template:
            raise ValueError("the chat template format needs the tokenizer's chat template")

    @classmethod
    def for_tokenizer(
        cls, template: str, tokenizer: PreTrainedTokenizerBase, turns: str = "last", repeat: int = 1
    ) -> PromptFormat:
        """A format that uses ``tokenizer``'s chat template (if ``template`` is chat).

        Raises:
            ValueError: for ``chat`` with a tokenizer without a chat template.
        """
        if template == "chat" and not has_chat_template(tokenizer):
            raise ValueError(
                "data.template is 'chat' but the tokenizer has no chat template; use 'paper' or 'raw', or a chat model"
            )
        return cls(template, turns, tokenizer.chat_template if template == "chat" else None, repeat)

    # ------------------------------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / PROMPT_FORMAT_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> PromptFormat | None:
        """The format recorded in a run directory, or None if it records none (runs from before formats)."""
        path = Path(directory) / PROMPT_FORMAT_NAME
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path} is damaged: {exc}") from None

    # ------------------------------------------------------------------------------------- rendering
    def training_pairs(
        self, tokenizer: PreTrainedTokenizerBase, conversation: Conversation
    ) -> list[tuple[str, str]]:
        """(prompt, answer) texts of the turns a conversation trains (``turns``), under this format.

        Raises:
            ValueError: the reason to skip the conversation.
        """
        if self.template == "chat":
            turns = conversation.assistant_turns if self.turns == "all" else conversation.assistant_turns[-1:]
            return [self._chat_pair(tokenizer, conversation.messages, i) for i in turns]
        if self.template == "paper":
            if not conversation.is_single_turn:
                raise ValueError(
                    "multi-turn conversation: the paper's template has one question and one answer; use template chat"
                )
            return [
                (
                    self.ask(instruction_prompt(_instruction(conversation.messages))),
                    " " + conversation.messages[-1]["content"],
                )
            ]
        raise ValueError("a conversation has no raw prompt/completion text; use template chat")

    def _chat_pair(self, tokenizer: PreTrainedTokenizerBase, messages, turn: int) -> tuple[str, str]:
        history = self.render(tokenizer, list(messages[:turn]))
        full = self._chat(
            tokenizer, [*self.asked(list(messages[:turn])), messages[turn]], generation_prompt=False
        )
        if not full.startswith(history):
            raise ValueError("the chat template does not render the history as a prefix of the conversation")
        return history, full.after(len(history))

    def _chat(
        self, tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool
    ) -> Rendered:
        """``messages`` under the chat template, with where their contents lie (`bitune.data.encoding`)."""

        def apply(conversation: list[dict]) -> str:
            return tokenizer.apply_chat_template(
                conversation,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                chat_template=self.chat_template,
            )

        rendered = with_content_spans(apply(messages), apply(mark(messages)), messages)
        if rendered.content is None:
            check_content(messages, tokenizer)
        return rendered

    def encode(self, tokenizer: PreTrainedTokenizerBase, text: str, prompt: bool) -> list[int]:
        """Token ids of a prompt or an answer written in this format: control tokens only from the template,
        the tokenizer's own special tokens (BOS) for a prompt in the paper's or the raw format."""
        add_special_tokens = prompt and self.adds_special_tokens
        return encode(tokenizer, text, add_special_tokens, plain_text=self.template == "paper")

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
        """The token ids of the prompt that asks for the next assistant turn after ``messages``."""
        return self.encode(tokenizer, self.render(tokenizer, messages), prompt=True)

    def render(self, tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
        """The prompt text that asks for the next assistant turn after ``messages`` (inference and training).

        Raises:
            ValueError: for content holding a control token's text under a chat template that rewrites content.
        """
        if self.template == "chat":
            return self._chat(tokenizer, self.asked(messages), generation_prompt=True)
        if self.template == "raw":
            return "".join(m["content"] for m in messages)
        # paper: earlier exchanges as Question/Answer pairs, then the question being asked
        parts, pending = [], []
        for message in messages:
            if message["role"] == "assistant":
                parts.append(instruction_prompt("\n\n".join(pending)) + " " + message["content"])
                pending = []
            else:
                pending.append(message["content"])
        parts.append(self.ask(instruction_prompt("\n\n".join(pending))))
        return "\n\n".join(parts)

    def ask(self, prompt: str) -> str:
        """A paper-template prompt (ending with "Answer:") with its question sent `repeat` times."""
        return repeat_question(prompt, self.repeat)

    def asked(self, messages: list[Message]) -> list[Message]:
        """``messages`` with the content of the last user message sent `repeat` times (chat templates)."""
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if self.repeat == 1 or last is None:
            return list(messages)
        repeated = Message(role="user", content="\n\n".join([messages[last]["content"]] * self.repeat))
        return [*messages[:last], repeated, *messages[last + 1 :]]

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the prompt is tokenized with the tokenizer's own special tokens (BOS): a chat template
        writes its own."""
        return self.template != "chat"

    @property
    def appends_eos(self) -> bool:
        """Whether an answer gets the EOS token appended (a chat template writes its end-of-turn itself)."""
        return self.template != "chat"


def _instruction(messages) -> str:
    """The paper's instruction of a single-turn conversation: system messages, a blank line, the user's."""
    parts = [m["content"] for m in messages if m["role"] == "system" and m["content"].strip()]
    parts += [m["content"] for m in messages if m["role"] == "user"]
    return "\n\n".join(parts)
