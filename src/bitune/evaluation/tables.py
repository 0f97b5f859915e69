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


def paired_table(results: dict[str, dict[int, dict]], tasks: list[str], baseline: str) -> str:
    """Markdown: every other method's score minus ``baseline``'s, compared question by question.

    Per question, each method's outcome is averaged over its seeds; the difference of the two averages,
    averaged over the questions, is the difference of the mean scores, and its standard error is the
    spread of the per-question differences over sqrt(questions). Pairing removes what the questions'
    difficulty adds to both scores: the more the two methods agree question by question, the smaller this
    standard error is against that of two unpaired scores.
    It measures the uncertainty from the questions drawn, not from the seeds (that is the ± of the table).
    Only runs whose scores carry per-question outcomes (``correct``) on the same questions are used.
    """
    lines = [
        f"| method | task | seeds | minus {baseline} (points) | paired standard error | 95 % interval |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        reference = _outcomes(results.get(baseline, {}), task)
        if reference is None:
            continue
        questions, base, base_seeds = reference
        for method, by_seed in results.items():
            other = _outcomes(by_seed, task, questions) if method != baseline else None
            if other is None:
                continue
            _, outcome, seeds = other
            differences = [a - b for a, b in zip(outcome, base, strict=True)]
            mean = 100 * statistics.fmean(differences)
            error = 100 * statistics.stdev(differences) / len(differences) ** 0.5
            lines.append(
                f"| {method} | {task} | {seeds} vs {base_seeds} | {mean:+.1f} | {error:.1f} "
                f"| {mean - 1.96 * error:+.1f} to {mean + 1.96 * error:+.1f} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _outcomes(by_seed: dict[int, dict], task: str, questions: str | None = None):
    """(questions digest, per-question mean outcome over seeds, number of seeds) of one method on ``task``,
    from the seeds whose score has outcomes (on ``questions``, if given); None if no seed has."""
    scores = [s[task] for s in by_seed.values() if "correct" in s.get(task, {})]
    questions = questions or (scores[0]["questions"] if scores else None)
    rows = [s["correct"] for s in scores if s["questions"] == questions]
    if not rows or len(rows[0]) < 2:
        return None
    return questions, [statistics.fmean(int(r[q]) for r in rows) for q in range(len(rows[0]))], len(rows)
