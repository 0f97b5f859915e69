"""User data in the common formats, read row by row: bad rows are skipped and counted, never trained on.

Sources: a ``.jsonl`` file (one object per line; a UTF-8 byte-order mark is read), a ``.json`` file (a list
of objects, or an object whose ``data``/``train`` field is that list), a ``.parquet`` file, a folder written
by ``datasets.save_to_disk`` (a ``DatasetDict`` folder takes ``split``), a Hugging Face hub dataset id
(``datasets.load_dataset(id, subset, split=split)``, for online users; a local folder of data files is read the
same way), or any iterable of dicts.

Formats, detected row by row unless one is given (a file may mix them; with a given format, a run whose rows
mostly do not fit it is refused with the counts):

| format | row | example |
|---|---|---|
| ``prompt_completion`` | ``{"prompt": str, "completion": str}`` (``response``/``output`` also) | `Instruction` |
| ``alpaca`` | ``{"instruction", "input", "output"}``; a non-empty input follows the instruction | `Instruction` |
| ``messages`` | ``{"messages": [{"role": system/user/assistant, "content"}, ...]}`` | `Conversation` |
| ``sharegpt`` | ``{"conversations": [{"from": system/human/gpt, "value"}, ...]}`` | `Conversation` |
| ``trl_conversational`` | ``{"prompt": [messages], "completion": [one assistant message]}`` | `Conversation` |

A conversation must end with an assistant message; which of its turns train is the run's ``data.turns``
(`bitune.data.chat`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..packages import require_package
from ..references import is_hub_id
from .chat import Conversation, normalize_messages
from .report import DataReport
from .templates import Instruction

_COMPLETION_KEYS = ("completion", "response", "output")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
FILE_TYPES = (".jsonl", ".json", ".parquet")
Example = Instruction | Conversation


def is_data_source(value: str) -> bool:
    """Whether ``value`` names local data this module reads: a data file or a ``datasets`` folder."""
    path = Path(value).expanduser()
    return (path.is_file() and path.suffix in FILE_TYPES) or path.is_dir()


def _is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def read_rows(
    source: str | Path | Iterable[dict], report: DataReport, split: str = "train", subset: str | None = None
) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs of a source (see the module docstring); lines that are not JSON are skipped into
    ``report``."""
    if not isinstance(source, (str, Path)):
        yield from enumerate(source)
        return
    path = Path(source).expanduser()
    if _is_dataset_folder(path):
        yield from enumerate(_dataset_folder(path, split))
    elif path.is_dir():  # a folder of data files: datasets reads it as it reads a hub dataset
        yield from enumerate(_hub_dataset(str(path), split, subset))
    elif path.suffix == ".jsonl" and path.is_file():
        yield from _jsonl(path, report)
    elif path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{path} is not a valid JSON file: {type(exc).__name__}") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("train"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
        yield from enumerate(data)
    elif path.suffix == ".parquet" and path.is_file():
        require_package("pyarrow", "pip install pyarrow", "Reading .parquet data")
        import pyarrow.parquet

        yield from enumerate(pyarrow.parquet.read_table(path).to_pylist())
    elif path.exists():
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {FILE_TYPES} or a datasets folder"
        )
    elif is_hub_id(str(source)):
        yield from enumerate(_hub_dataset(str(source), split, subset))
    else:
        raise FileNotFoundError(f"data file {path} does not exist")


def _jsonl(path: Path, report: DataReport) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            try:
                line = raw.decode("utf-8-sig" if index == 0 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError:
                report.skip("line is not UTF-8 text", index)
                continue
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                report.skip("line is not valid JSON (or nested too deeply)", index)


def _dataset_folder(path: Path, split: str) -> Iterable[dict]:
    require_package("datasets", "pip install datasets", "Reading a datasets folder")
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path} has splits {sorted(data)}, not {split!r} (data.split)")
        data = data[split]
    return data


def _hub_dataset(name: str, split: str, subset: str | None) -> Iterable[dict]:
    require_package("datasets", "pip install datasets", "Loading a hub dataset")
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"could not load the hub dataset {name!r} (split {split!r}; offline?): {first}"
        ) from None


def _string(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise ValueError(f"field '{key}' is empty")
    return valid_text(value, key)


def valid_text(value: str, name: str) -> str:
    """``value`` if it is encodable text (a lone surrogate from a JSON escape is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"field '{name}' is not valid Unicode text (a lone surrogate)") from None
    return value


# ------------------------------------------------------------------------------------- the formats
def _prompt_completion(row: dict) -> Instruction:
    key = next((k for k in _COMPLETION_KEYS if k in row), "completion")
    return Instruction(_string(row, "prompt"), _string(row, key))


def _alpaca(row: dict) -> Instruction:
    instruction = _string(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"field 'input' is {type(extra).__name__}, not a string")
    if extra and extra.strip():
        instruction = f"{instruction}\n{valid_text(extra, 'input')}"
    return Instruction(instruction, _string(row, "output"))


def _messages(row: dict) -> Conversation:
    return Conversation(normalize_messages(row.get("messages")))


def _sharegpt(row: dict) -> Conversation:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise ValueError("field 'conversations' is not a list")
    if any(not isinstance(t, dict) or not isinstance(t.get("from"), str) or t["from"] not in SHAREGPT_ROLES
           for t in turns):  # fmt: skip
        raise ValueError(f"a turn's 'from' is not one of {sorted(SHAREGPT_ROLES)}")
    return Conversation(
        normalize_messages([{"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")} for t in turns])
    )


def _trl_conversational(row: dict) -> Conversation:
    completion = row.get("completion")
    if not isinstance(completion, list) or len(completion) != 1:
        raise ValueError("field 'completion' is not a list of one assistant message")
    if not isinstance(row.get("prompt"), list):
        raise ValueError("field 'prompt' is not a list of messages")
    return Conversation(normalize_messages([*row["prompt"], *completion]))


def _is_conversation(row: dict) -> bool:
    return "messages" in row or "conversations" in row


@dataclass(frozen=True)
class Format:
    """A data format: whether a row is written in it, and the row as an example (raises ValueError naming
    what is wrong with the row). At most one format detects any row."""

    name: str
    detect: Callable[[dict], bool]
    to_example: Callable[[dict], Example]
    conversational: bool


REGISTRY = {
    f.name: f
    for f in (
        Format(
            "prompt_completion",
            lambda row: "prompt" in row and not isinstance(row["prompt"], list) and not _is_conversation(row),
            _prompt_completion,
            conversational=False,
        ),
        Format(
            "alpaca",
            lambda row: "instruction" in row and "prompt" not in row and not _is_conversation(row),
            _alpaca,
            conversational=False,
        ),
        Format("messages", lambda row: "messages" in row, _messages, conversational=True),
        Format(
            "sharegpt",
            lambda row: "conversations" in row and "messages" not in row,
            _sharegpt,
            conversational=True,
        ),
        Format(
            "trl_conversational",
            lambda row: isinstance(row.get("prompt"), list) and not _is_conversation(row),
            _trl_conversational,
            conversational=True,
        ),
    )
}
FORMATS = tuple(REGISTRY)
CONVERSATIONAL = tuple(name for name, f in REGISTRY.items() if f.conversational)


def detect_format(row: Any) -> str | None:
    """The format a row is written in, or None if it fits none."""
    if not isinstance(row, dict):
        return None
    return next((name for name, f in REGISTRY.items() if f.detect(row)), None)


def to_example(row: Any, fmt: str) -> Example:
    """One row as an `Instruction` or a `Conversation`; raises ValueError naming what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    if fmt not in REGISTRY:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    return REGISTRY[fmt].to_example(row)


def load_examples(
    source: str | Path | Iterable[dict],
    fmt: str = "auto",
    name: str | None = None,
    split: str = "train",
    subset: str | None = None,
) -> tuple[list[Example], DataReport]:
    """Read user data into examples; malformed rows are skipped with their reason, never raised.

    Raises:
        ValueError: if the format is unknown, no row is usable, or most rows do not fit a chosen format.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"data format must be 'auto' or one of {FORMATS}, got {fmt!r}")
    report = DataReport(name or str(source) if isinstance(source, (str, Path)) else name or "user data")
    examples: list[Example] = []
    rows = 0
    for index, row in read_rows(source, report, split, subset):
        rows += 1
        if not isinstance(row, dict):
            report.skip(f"row is a {type(row).__name__}, not an object", index)
            continue
        detected = detect_format(row)
        if detected is None:
            report.skip("row fits no known format", index)
            continue
        if fmt != "auto" and detected != fmt:
            report.skip(f"row is in format {detected!r}, not the chosen {fmt!r}", index)
            continue
        try:
            examples.append(to_example(row, detected))
        except ValueError as exc:
            report.skip(str(exc), index)
    if not examples and rows:
        raise ValueError(
            f"{report.source}: none of its {rows} rows could be used ({report.skipped_counts()}); known formats: "
            f"{', '.join(FORMATS)}"
        )
    if fmt != "auto" and len(examples) < rows / 2:
        raise ValueError(
            f"{report.source}: only {len(examples)} of {rows} rows fit the chosen format {fmt!r} "
            f"({report.skipped_counts()}); check data.format (or use auto)"
        )
    report.kept = len(examples)
    return examples, report
