"""User data: three formats, malformed rows skipped with their reason and counted, never raised."""

from __future__ import annotations

import json

import pytest

from bitune.data import Instruction, load_instructions


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_completion_with_bad_rows_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Hi?", "completion": "Hello."},
            {"prompt": "", "completion": "x"},  # empty prompt
            {"prompt": "No answer"},  # missing field
            {"prompt": "Typed", "completion": 5},  # wrong type
            "{not json",
            [1, 2],  # not an object
            {"prompt": "Two?", "response": "Yes."},
        ],
    )
    examples, report = load_instructions(path)
    assert examples == [Instruction("Hi?", "Hello."), Instruction("Two?", "Yes.")]
    assert report.kept == 2 and report.total == 7
    assert report.skipped == {
        "field 'prompt' is empty": 1,
        "missing field 'completion'": 1,
        "field 'completion' is int, not a string": 1,
        "line is not valid JSON": 1,
        "row is a list, not an object": 1,
    }
    assert "kept 2 of 7 rows" in report.summary()


def test_alpaca_appends_input(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Bad input", "input": 3, "output": "x"},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    examples, report = load_instructions(path)
    assert examples == [Instruction("Translate.\nchat", "cat"), Instruction("Say hi.", "hi")]
    assert report.skipped == {"field 'input' is int, not a string": 1}


def test_messages_single_turn_only():
    rows = [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
                {"role": "user", "content": "Q again"},
                {"role": "assistant", "content": "A again"},
            ]
        },
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    examples, report = load_instructions(rows)
    assert examples == [Instruction("Q1", "A1"), Instruction("Be brief.\n\nQ2", "A2")]
    assert report.skipped == {
        "multi-turn conversation (only single-turn prompt/answer pairs are used)": 1,
        "expected one user message and an assistant message last": 1,
    }


def test_unusable_sources_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_instructions(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no row has a known format"):
        load_instructions([{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="unsupported file type"):
        load_instructions(write_jsonl(tmp_path / "d.csv", ["a,b"]))
    with pytest.raises(ValueError, match="data format must be"):
        load_instructions([], fmt="sharegpt")
