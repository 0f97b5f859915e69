"""User instruction data in the common formats, read row by row: bad rows are skipped and counted.

Accepted sources: a ``.jsonl`` file (one object per line), a ``.json`` file (a list of objects, or an
object whose ``data``/``train`` field is that list), a Hugging Face ``datasets.Dataset``, or any iterable
of dicts. Accepted formats (detected from the first usable row unless given):

- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` (``response``/``output`` also accepted
  for the completion).
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}``; a non-empty ``input`` is appended to
  the instruction after a newline.
- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``. Single-turn only: optional
  system messages (prepended to the user message, separated by a blank line), one user message, one
  assistant message last. Multi-turn conversations are skipped and counted: Bitune's unit is one
  prompt and one answer, and flattening earlier turns into the prompt would silently change the task.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .report import DataReport
from .templates import Instruction

FORMATS = ("prompt_completion", "alpaca", "messages")
_COMPLETION_KEYS = ("completion", "response", "output")


def read_rows(source: str | Path | Iterable[dict], report: DataReport) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs of a file or iterable; lines that are not JSON are skipped into ``report``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for index, line in enumerate(handle):
                    if not line.strip():
                        continue
                    try:
                        yield index, json.loads(line)
                    except json.JSONDecodeError:
                        report.skip("line is not valid JSON", index)
            return
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = data.get("data", data.get("train"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
            yield from enumerate(data)
            return
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .json")
    yield from enumerate(source)


def detect_format(row: Any) -> str | None:
    """The format a row is written in, or None if it fits none."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and any(k in row for k in _COMPLETION_KEYS):
        return "prompt_completion"
    return None


def _string(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return value


def to_instruction(row: Any, fmt: str) -> Instruction:
    """One row as an `Instruction`; raises ValueError naming what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    if fmt == "prompt_completion":
        key = next((k for k in _COMPLETION_KEYS if k in row), "completion")
        return Instruction(_string(row, "prompt"), _string(row, key))
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"field 'input' is {type(extra).__name__}, not a string")
        if extra and extra.strip():
            instruction = f"{instruction}\n{extra}"
        return Instruction(instruction, _string(row, "output"))
    if fmt == "messages":
        return _messages(row)
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")


def _messages(row: dict) -> Instruction:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' is not a non-empty list")
    roles = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError("a message is not an object with string 'content'")
        roles.append(message.get("role"))
    if roles.count("user") > 1 or roles.count("assistant") > 1:
        raise ValueError("multi-turn conversation (only single-turn prompt/answer pairs are used)")
    if roles[-1] != "assistant" or roles.count("user") != 1:
        raise ValueError("expected one user message and an assistant message last")
    if any(r not in ("system", "user", "assistant") for r in roles):
        raise ValueError(f"unknown role among {sorted(set(map(str, roles)))}")
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"].strip()]
    user = next(m["content"] for m in messages if m["role"] == "user")
    answer = messages[-1]["content"]
    if not user.strip() or not answer.strip():
        raise ValueError("empty user or assistant message")
    return Instruction("\n\n".join([*system, user]), answer)


def load_instructions(
    source: str | Path | Iterable[dict], fmt: str = "auto", name: str | None = None
) -> tuple[list[Instruction], DataReport]:
    """Read user data into instructions; malformed rows are skipped with their reason, never raised.

    Raises:
        ValueError: if the format is unknown or cannot be detected from any row (nothing to train on).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"data format must be 'auto' or one of {FORMATS}, got {fmt!r}")
    report = DataReport(name or str(source) if isinstance(source, (str, Path)) else name or "user data")
    examples: list[Instruction] = []
    for index, row in read_rows(source, report):
        if fmt == "auto":
            detected = detect_format(row)
            if detected is None:
                report.skip("row fits no known format", index)
                continue
            fmt = detected
        try:
            examples.append(to_instruction(row, fmt))
        except ValueError as exc:
            report.skip(str(exc), index)
    if fmt == "auto":
        raise ValueError(
            f"{report.source}: no row has a known format (prompt/completion, instruction/input/output, or "
            "messages)"
        )
    report.kept = len(examples)
    return examples, report
