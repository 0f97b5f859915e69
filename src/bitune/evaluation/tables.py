"""Scores laid out like the paper's tables: accuracy % per task and the average, mean ± std over seeds."""

from __future__ import annotations

import statistics

from .stats import paired_difference


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


def paired_table(
    results: dict[str, dict[int, dict]],
    tasks: list[str],
    baseline: str,
    fixed: set[str] | frozenset = frozenset(),
) -> str:
    """Markdown: every other method's score minus ``baseline``'s, compared question by question, per task
    and pooled over the tasks (every question weighs the same), with the standard errors of
    `bitune.evaluation.stats.paired_difference`: over the questions alone (pairing), and with the run-level
    (seed) term, which gives the 95 % interval and the difference the design detects at 80 % power.

    Args:
        results: method -> seed -> task -> scores; only scores with per-question outcomes (``correct``) on the
            same questions are compared.
        fixed: methods scored once without training (no run-to-run variance).
    """
    lines = [
        f"| method | task | seeds | minus {baseline} (points) | paired SE, questions | SE with seeds "
        "| 95 % interval | detects at 80 % power |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pooled = len(tasks) > 1
    for task in [*tasks, *(["pooled"] if pooled else [])]:
        scope = tasks if task == "pooled" else [task]
        reference = _runs(results.get(baseline, {}), scope)
        if reference is None:
            continue
        questions, base = reference
        for method, by_seed in results.items():
            other = _runs(by_seed, scope, questions) if method != baseline else None
            if other is None:
                continue
            d = paired_difference(other[1], base, a_is_fixed=method in fixed, b_is_fixed=baseline in fixed)
            name = f"pooled ({d.questions} questions)" if task == "pooled" else task
            se = "n/a (one seed)" if d.se is None else f"{100 * d.se:.1f}"
            interval = (
                "n/a" if d.se is None else "{:+.1f} to {:+.1f}".format(*(100 * x for x in d.interval()))
            )
            detects = "n/a" if d.detectable is None else f"{100 * d.detectable:.1f}"
            lines.append(
                f"| {method} | {name} | {d.seeds_a} vs {d.seeds_b} | {100 * d.difference:+.1f} "
                f"| {100 * d.se_questions:.1f} | {se} | {interval} | {detects} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def _runs(by_seed: dict[int, dict], tasks: list[str], questions: tuple[str, ...] | None = None):
    """(the questions' digests, one row of per-question outcomes per seed, the tasks' outcomes joined) of one
    method over ``tasks``, from the seeds that have outcomes on every task (on ``questions``, if given); None
    if no seed has."""
    rows, digests = [], None
    for scores in by_seed.values():
        if not all("correct" in scores.get(task, {}) for task in tasks):
            continue
        found = tuple(scores[task]["questions"] for task in tasks)
        digests = digests or questions or found
        if found == digests:
            rows.append([int(c) for task in tasks for c in scores[task]["correct"]])
    if not rows or len(rows[0]) < 2:
        return None
    return digests, rows
