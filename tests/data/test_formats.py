"""User data: every format and source, malformed rows skipped with their reason and counted, never raised."""

from __future__ import annotations

import json

import pytest

from bitune.data import FORMATS, Conversation, Instruction, load_examples


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
    examples, report = load_examples(path)
    assert examples == [Instruction("Hi?", "Hello."), Instruction("Two?", "Yes.")]
    assert report.kept == 2 and report.total == 7
    assert report.skipped == {
        "field 'prompt' is empty": 1,
        "missing field 'completion'": 1,
        "field 'completion' is int, not a string": 1,
        "line is not valid JSON (or nested too deeply)": 1,
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
    examples, report = load_examples(path)
    assert examples == [Instruction("Translate.\nchat", "cat"), Instruction("Say hi.", "hi")]
    assert report.skipped == {"field 'input' is int, not a string": 1}


CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
)
EVERY_FORMAT = [
    ({"prompt": "Hi?", "completion": "Hello."}, Instruction("Hi?", "Hello.")),
    ({"instruction": "Translate.", "input": "chat", "output": "cat"}, Instruction("Translate.\nchat", "cat")),
    ({"messages": list(CONVERSATION)}, Conversation(CONVERSATION)),
    (
        {
            "conversations": [
                {
                    "from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                    "value": m["content"],
                }
                for m in CONVERSATION
            ]
        },
        Conversation(CONVERSATION),
    ),
    ({"prompt": list(CONVERSATION[:4]), "completion": [CONVERSATION[4]]}, Conversation(CONVERSATION)),
]


def test_every_format_is_detected_per_row_and_read():
    examples, report = load_examples([row for row, _ in EVERY_FORMAT])
    assert examples == [example for _, example in EVERY_FORMAT] and report.kept == 5 and not report.skipped
    for fmt, (row, example) in zip(FORMATS, EVERY_FORMAT, strict=True):
        assert load_examples([row], fmt=fmt)[0] == [example]


def test_malformed_conversations_are_skipped_with_their_reason():
    rows = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"conversations": [{"from": "alien", "value": "x"}]},
        {"prompt": [{"role": "user", "content": "q"}], "completion": "a string"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {"messages": list(CONVERSATION)},
    ]
    examples, report = load_examples(rows)
    assert examples == [Conversation(CONVERSATION)]
    assert report.skipped == {
        "a conversation must end with an assistant message": 1,
        "unknown role 'robot' (expected one of ('system', 'user', 'assistant'))": 1,
        "a turn's 'from' is not one of ['assistant', 'gpt', 'human', 'system', 'user']": 1,
        "field 'completion' is not a list of one assistant message": 1,
        "an empty assistant message": 1,
    }


def test_parquet_files_dataset_folders_and_hub_style_loading(tmp_path):
    import datasets

    rows = [row for row, _ in EVERY_FORMAT[:1]] * 3
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    assert load_examples(tmp_path / "d.parquet")[0] == [EVERY_FORMAT[0][1]] * 3
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_examples(tmp_path / "saved")[0] == [EVERY_FORMAT[0][1]] * 3
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_examples(tmp_path / "dict", split="test")[0]) == 1
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'dev'"):
        load_examples(tmp_path / "dict", split="dev")
    # a folder of data files goes through datasets.load_dataset, the path hub dataset ids take
    (tmp_path / "files").mkdir()
    write_jsonl(tmp_path / "files" / "train.jsonl", rows)
    assert load_examples(tmp_path / "files")[0] == [EVERY_FORMAT[0][1]] * 3


def test_unusable_sources_fail_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(
        ValueError, match=r"none of its 1 rows could be used \(1 skipped: row fits no known format\)"
    ):
        load_examples([{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="unsupported file type"):
        load_examples(write_jsonl(tmp_path / "d.csv", ["a,b"]))
    with pytest.raises(ValueError, match="data format must be"):
        load_examples([], fmt="openai")
