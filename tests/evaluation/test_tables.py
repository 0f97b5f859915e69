"""Score tables: means and standard deviations over seeds, and methods compared question by question."""

from __future__ import annotations

from bitune.evaluation.tables import paired_table, results_table


def test_results_table_means_and_stds():
    results = {"a": {1: {"x": {"acc": 0.5}, "y": {"acc": 0.7}}, 2: {"x": {"acc": 0.7}, "y": {"acc": 0.9}}}}
    table = results_table(results, ["x", "y"])
    assert table.splitlines()[2] == "| a | 2 | 60.0 ± 14.1 | 80.0 ± 14.1 | 70.0 ± 14.1 |"
    assert results_table({"b": {1: {"x": {"acc": 0.25}}}}, ["x"]).endswith("| b | 1 | 25.0 | 25.0 |")


def test_paired_table_compares_per_question_means_over_seeds():
    def score(correct, questions="q"):
        return {"x": {"acc": correct.count("1") / len(correct), "correct": correct, "questions": questions}}

    results = {
        "lora": {1: score("1100"), 2: score("1000")},
        "bitune": {1: score("1110"), 2: score("1101")},
        "other": {1: score("1111", questions="elsewhere")},  # other questions: not paired
        "old": {1: {"x": {"acc": 0.5}}},  # no outcomes recorded
    }
    table = paired_table(results, ["x"], "lora").splitlines()
    # per question: bitune 1, 1, .5, .5 minus lora 1, .5, 0, 0 -> 0, .5, .5, .5: mean .375, stdev .25
    # run-level variance 0 here (each run's residual accounts for its spread): SE with seeds = paired SE
    assert table[2] == "| bitune | x | 2 vs 2 | +37.5 | 12.5 | 12.5 | +13.0 to +62.0 | 35.0 |"
    assert len(table) == 3
    assert paired_table(results, ["x"], "old") == ""  # a baseline without outcomes: no table


def test_paired_table_pools_the_tasks_and_adds_the_run_term():
    def score(correct):
        return {
            "acc": correct.count("1") / len(correct),
            "correct": correct,
            "questions": "q" + str(len(correct)),
        }

    results = {
        "pretrained": {1: {"x": score("1000"), "y": score("10")}},
        "lora": {1: {"x": score("1100"), "y": score("11")}, 2: {"x": score("0000"), "y": score("00")}},
    }
    table = paired_table(results, ["x", "y"], "pretrained", fixed={"pretrained"}).splitlines()
    assert [row.split(" | ")[1] for row in table[2:]] == ["x", "y", "pooled (6 questions)"]
    pooled = table[-1].split(" | ")
    # lora's two runs: all right on the first half, all wrong: its seeds differ, the paired SE alone cannot see it
    assert float(pooled[5]) > float(pooled[4])
    one_seed = paired_table({"a": {1: results["lora"][1]}, "b": results["lora"]}, ["x"], "b").splitlines()
    assert "n/a (one seed)" in one_seed[2]
