"""Fuzzed rows: arbitrary JSON in every field of every data format. Every row is kept or skipped with a
reason, nothing raises, and what is kept renders and tokenizes under the paper's and a chat template."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bitune.data import PromptFormat, build_rows, load_examples
from fuzzing import ROW

from conftest import char_tokenizer, count_fuzz_example

GOOD = {"prompt": "a question", "completion": "an answer"}  # so that a file is never wholly unusable
TOKENIZER = char_tokenizer()
TOKENIZER.chat_template = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
FORMATS = [PromptFormat("paper"), PromptFormat.for_tokenizer("chat", TOKENIZER, turns="all", repeat=2)]


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(ROW, max_size=6))
def test_every_row_is_kept_or_skipped_with_a_reason(rows):
    count_fuzz_example("data rows (lists of up to 6 rows)")
    examples, report = load_examples([*rows, GOOD])
    assert report.kept == len(examples) >= 1
    assert report.kept + sum(report.skipped.values()) == len(rows) + 1
    assert all(isinstance(reason, str) and reason for reason in report.skipped)
    for prompt_format in FORMATS:
        built, built_report = build_rows(examples, TOKENIZER, prompt_format=prompt_format)
        assert built_report.kept == len(built)
        for row in built:
            assert 1 <= row["prompt_length"] < len(row["input_ids"]) == len(row["labels"])


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(ROW, max_size=4))
def test_a_jsonl_file_of_fuzzed_lines_loads_or_is_refused_in_one_line(tmp_path_factory, rows):
    count_fuzz_example("data files (.jsonl of up to 4 rows)")
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n", encoding="utf-8", errors="surrogatepass"
    )
    try:
        _, report = load_examples(path)
    except ValueError as exc:  # no usable row at all: a file-level error, one line
        assert "none of its" in str(exc) and "\n" not in str(exc)
        return
    assert report.kept + sum(report.skipped.values()) == len(rows) + 1
