"""`bitune eval`: score a trained run (or a checkpoint, a snapshot) or a base model on bitune's tasks through
lm-evaluation-harness, and write the report. A run trained with its model's chat template is asked the
questions in that template (lm-eval's ``apply_chat_template`` with the run's recorded template), as it was
trained; the paper's and raw formats use the tasks' own prompts.

Model arguments reach lm-eval as a dict, never as a ``key=value,...`` string built from user input: a path
with a comma stays a path, and ``trust_remote_code`` comes only from its own explicit option.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..card import write_model_card
from ..data import PromptFormat
from ..layout import EVAL_DIR, is_model_dir
from ..references import resolve_run
from .tables import results_table
from .tasks import DEFAULT_BATCH_SIZE, PAPER_TASKS, TASKS_DIR, lm_eval_task, summarize


def evaluate(
    model_args: dict[str, Any],
    tasks: list[str] | tuple[str, ...],
    limit: int | float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **kwargs,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` with the ``bitune`` model type and bitune's tasks available.

    Args:
        model_args: arguments of `bitune.evaluation.harness.BituneLM`, e.g. ``{"pretrained": "runs/x"}``.
        tasks: lm-eval task or group names (``bitune_*`` tasks, or any lm-eval task).
        limit: questions per task (lm-eval's ``limit``).
        batch_size: prompts per forward.

    Returns:
        lm-eval's results dict.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from . import harness  # noqa: F401  (registers the `bitune` model type)

    return lm_eval.simple_evaluate(
        model="bitune",
        model_args=dict(model_args),
        tasks=list(tasks),
        limit=limit,
        batch_size=batch_size,
        # lm-eval's own task index takes ~10 s to build; skip it when only bitune's tasks are asked for
        task_manager=TaskManager(
            include_path=str(TASKS_DIR), include_defaults=not all(t.startswith("bitune_") for t in tasks)
        ),
        **kwargs,
    )


def evaluate_target(
    target: str,
    tasks: list[str] | tuple[str, ...] = PAPER_TASKS,
    source: str = "packaged",
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_gen_toks: int | None = None,
    trust_remote_code: bool = False,
    choices: str = "listed",
    metric: str = "acc",
    prompt_repeat: int | None = None,
    cache: str | Path | None = None,
) -> dict[str, dict]:
    """Scores of a Bitune model directory or a base model (alias, directory, hub id) on bitune tasks.

    Args:
        max_gen_toks: caps generation on generative tasks (GSM8K; the task's own default is 256).
        choices: multiple-choice questions with their choices ``listed`` (the paper's templates) or as a
            ``cloze``.
        metric: the headline score of a multiple-choice task, ``acc`` or ``acc_norm``.
        prompt_repeat: send each question this many times (default: as the run was trained; 1 for a base
            model).
        cache: a path for lm-eval's request cache (``use_cache``; ``_rank0.db`` is appended): every
            continuation scored is written there at once, and a scoring started again with the same cache
            scores only what is not in it. It must belong to this target and these arguments alone.
    """
    names = [lm_eval_task(t, source, choices) for t in tasks]
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extra = {"gen_kwargs": {"max_gen_toks": max_gen_toks}} if max_gen_toks else {}
    if uses_chat_template(target):  # questions are asked as the run was trained: in its chat template
        extra["apply_chat_template"] = True
    if prompt_repeat is not None and prompt_repeat < 1:
        raise ValueError(f"prompt_repeat must be >= 1, got {prompt_repeat}")
    model_args = {"pretrained": str(target), "trust_remote_code": trust_remote_code}
    if prompt_repeat is not None:
        model_args["prompt_repeat"] = prompt_repeat
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        extra["use_cache"] = str(cache)
    results = evaluate(model_args, names, limit=limit, batch_size=batch_size, **extra)
    return summarize(results, list(tasks), source, choices, metric)


def uses_chat_template(target: str) -> bool:
    """Whether ``target`` is a saved Bitune model trained with the chat template prompt format."""
    local = resolve_run(str(target))
    prompt_format = PromptFormat.load(local) if is_model_dir(local) else None
    return prompt_format is not None and prompt_format.template == "chat"


def default_report_dir(target: str) -> Path:
    """Where `bitune eval` reports a target: ``<model dir>/eval`` for a Bitune model, otherwise
    ``runs/eval/<name>-<hash>``, unique per target (two targets with one base name never share a folder)."""
    if is_model_dir(target):
        return Path(target) / EVAL_DIR
    resolved = str(Path(target).expanduser().resolve()) if Path(target).expanduser().exists() else target
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(resolved).name).strip("._") or "model"
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
    return Path("runs") / EVAL_DIR / f"{name}-{digest}"


def write_report(summary: dict[str, dict], name: str, output_dir: str | Path) -> str:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; return the markdown table. A run's
    own report (``RUN/eval``) also goes into the run's model card."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps({"model": name, "scores": summary}, indent=2) + "\n")
    table = results_table({name: {0: summary}}, list(summary))
    (output_dir / "results.md").write_text(table + "\n")
    if output_dir.name == EVAL_DIR and is_model_dir(output_dir.parent):
        write_model_card(output_dir.parent)
    return table
