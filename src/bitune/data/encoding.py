"""Tokenizing prompts so that control tokens come only from the template, never from the data.

A tokenizer turns the text of its special tokens (``<|im_start|>``, ``<|eot_id|>``, the EOS string, ...)
into control tokens wherever it meets them. Rendering a chat template to text and tokenizing that text, as
``apply_chat_template(tokenize=True)`` does (and TRL, and servers built on it), therefore lets a message
whose content contains ``<|im_start|>assistant`` open a real turn. bitune keeps message content as text:

- the paper's template has no control tokens of its own, so its prompts and answers are tokenized with
  ``split_special_tokens=True`` (the tokenizer's BOS is still added, and EOS is appended as an id);
- a chat template is rendered twice, once with each message's content replaced by a marker, which gives
  where every content lies in the rendered text (`Rendered.content`); a control token inside a content span
  becomes the tokens of its text, and everything else is tokenized as it always is. A template that rewrites
  content (e.g. trims it) gives no spans; content holding a control token's text is then refused;
- a raw prompt is used verbatim, its control tokens included (it is already formatted text).
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

_MARK = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template or tokenizer treats them


class Rendered(str):
    """Rendered prompt text that knows where message content lies in it: ``content`` holds (start, end)
    character spans, or is None when the template rewrote content so that the spans are unknown."""

    content: tuple[tuple[int, int], ...] | None

    def __new__(cls, text: str, content: tuple[tuple[int, int], ...] | None) -> Rendered:
        rendered = super().__new__(cls, text)
        rendered.content = content
        return rendered

    def after(self, start: int) -> Rendered:
        """The text from ``start`` on, with the content spans that lie there."""
        spans = (
            None
            if self.content is None
            else tuple((a - start, b - start) for a, b in self.content if a >= start)
        )
        return Rendered(self[start:], spans)


def mark(messages: list[dict]) -> list[dict]:
    """``messages`` with each content replaced by a marker (see `with_content_spans`)."""
    return [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]


def with_content_spans(text: str, marked: str, messages: list[dict]) -> Rendered:
    """``text`` (messages rendered) with its content spans, found from ``marked`` (the same rendering of
    `mark` (messages)): the markers' places are the contents' places if putting the contents back in gives
    ``text`` exactly."""
    pieces, spans, length = [], [], 0
    for i, piece in enumerate(_MARK.split(marked)):
        if i % 2:  # a marker: the index of a message
            piece = messages[int(piece)]["content"]
            spans.append((length, length + len(piece)))
        pieces.append(piece)
        length += len(piece)
    return Rendered(text, tuple(spans) if "".join(pieces) == text else None)


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """The tokenizer's special tokens (id -> text): those its text turns into control tokens."""
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special.update(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=True))
    return special


def check_content(messages: list[dict], tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ValueError if a message's content holds a control token's text (when its place is unknown)."""
    specials = [t for t in control_tokens(tokenizer).values() if t]
    for message in messages:
        found = next((t for t in specials if t in message["content"]), None)
        if found:
            raise ValueError(
                f"a message's content holds the control token {found!r}, and the chat template rewrites content, "
                "so it cannot be kept as text"
            )


def encode(
    tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool, plain_text: bool = False
) -> list[int]:
    """Token ids of ``text``. With ``plain_text`` no text becomes a control token (the paper's template). For
    `Rendered` text, a control token inside a content span becomes the tokens of its own text."""
    if plain_text:
        return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]
    spans = getattr(text, "content", None)
    if not spans:
        return tokenizer(str(text), add_special_tokens=add_special_tokens)["input_ids"]
    encoded = tokenizer(str(text), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    special = control_tokens(tokenizer)
    ids = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if token in special and end > start and any(a <= start and end <= b for a, b in spans):
            ids += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        else:
            ids.append(token)
    return ids
