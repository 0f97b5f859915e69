"""Scores laid out like the paper's tables: accuracy % per task and the average, mean ± std over seeds."""

from __future__ import annotations

import statistics


def results_table(results: dict[str, dict[int, dict]], tasks: list[str], metric: str = "acc") -> str:
    """Markdown: one row per method, one column per task plus the average.

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


def stderr_note(results: dict[str, dict[int, dict]], tasks: list[str], metric: str = "acc") -> str:
    """One line under a results table: ± there is the spread over seeds; the standard error of a single
    score on the questions scored (mean over the scores, in points) is a different uncertainty."""
    parts = []
    for task in tasks:
        scores = [s[task] for by_seed in results.values() for s in by_seed.values() if task in s]
        errors = [s[f"{metric}_stderr"] for s in scores if s.get(f"{metric}_stderr") is not None]
        if errors:
            parts.append(f"{task} {100 * statistics.fmean(errors):.1f} (n={scores[0].get('n', '?')})")
    if not parts:
        return ""
    return (
        "± is the standard deviation over seeds. Standard error of one run's score on its questions, "
        "in points: " + ", ".join(parts) + "."
    )
