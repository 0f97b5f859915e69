"""Which questions a model got right, recorded with every score for paired comparisons."""

from __future__ import annotations

from bitune.evaluation.tasks import question_outcomes


def test_question_outcomes_follow_the_headline_metric_in_question_order():
    samples = [
        {"doc_id": 1, "filter": "none", "acc": 0.0, "doc_hash": "b"},
        {"doc_id": 0, "filter": "none", "acc": 1.0, "doc_hash": "a"},
        {"doc_id": 0, "filter": "other", "acc": 0.0, "doc_hash": "a"},
    ]
    outcomes = question_outcomes(samples, "acc,none")
    assert outcomes["correct"] == "10" and len(outcomes["questions"]) == 16
    reordered = question_outcomes([samples[1], samples[0]], "acc,none")
    assert reordered == outcomes
    assert (
        question_outcomes([{**samples[1], "doc_hash": "c"}, samples[0]], "acc,none")["questions"]
        != (outcomes["questions"])
    )  # other questions: another digest, never paired
    assert question_outcomes([{**samples[0], "acc": 0.5}], "acc,none") == {}  # not right/wrong
    assert question_outcomes([], "acc,none") == {}
