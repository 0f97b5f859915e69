"""How sure a comparison of two methods is, from their per-question outcomes over seeds.

Each method ran with a few seeds, and each run answered the same questions. The difference of the two
methods' mean scores has two sources of uncertainty:

- the questions drawn: handled by pairing, question by question (the per-question differences of the two
  methods' outcomes, averaged over seeds; their spread over sqrt(questions) is the **paired** standard error);
- the runs: a whole run can be better or worse on every question (its seed draws the adapters' init and the
  data order). Pairing cannot see this, since it shifts every per-question difference alike. Its size is the
  between-run variance of each method's run means, less what the question-level noise of one run adds to a
  run mean (a two-way analysis of variance, runs x questions).

`paired_difference` adds the two: ``se**2 = se_questions**2 + var_runs_a / seeds_a + var_runs_b / seeds_b``.
A method scored once without training (the pretrained model) has no run variance. With one trained seed the
run term cannot be estimated and is reported as missing. `bootstrap_se` checks it by resampling questions and
seeds together. A design's power: a difference of `detectable` points is found at 80 % power by a two-sided
test at 5 % (2.80 standard errors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z_95 = 1.959964
Z_POWER_80 = 0.841621

Runs = Sequence[Sequence[float]]  # runs x questions: one row of per-question outcomes per seed


@dataclass(frozen=True)
class PairedDifference:
    """A's mean score minus B's, with its uncertainty (in the outcomes' units: fractions of a question)."""

    difference: float
    se_questions: float  # the paired standard error over questions alone
    se_runs: float | None  # the run-level term (None: a trained method with one seed)
    questions: int
    seeds_a: int
    seeds_b: int

    @property
    def se(self) -> float | None:
        """The standard error with both terms (None when the run term is unknown)."""
        return None if self.se_runs is None else math.hypot(self.se_questions, self.se_runs)

    def interval(self) -> tuple[float, float] | None:
        """The 95 % confidence interval of the difference."""
        se = self.se
        return None if se is None else (self.difference - Z_95 * se, self.difference + Z_95 * se)

    @property
    def detectable(self) -> float | None:
        """The difference this design detects at 80 % power (two-sided test at 5 %)."""
        se = self.se
        return None if se is None else (Z_95 + Z_POWER_80) * se


def run_variance(runs: Runs) -> float:
    """The between-run variance component of one method's scores: the variance of its run means less the
    share of the runs x questions residual that a mean over the questions carries (never below 0)."""
    y = np.asarray(runs, dtype=float)  # (seeds, questions)
    seeds, questions = y.shape
    if seeds < 2:
        raise ValueError("a run variance needs at least two runs")
    run_means, question_means = y.mean(axis=1), y.mean(axis=0)
    residual = y - run_means[:, None] - question_means[None, :] + y.mean()
    noise = float((residual**2).sum()) / ((seeds - 1) * (questions - 1))
    return max(0.0, float(run_means.var(ddof=1)) - noise / questions)


def paired_difference(
    a: Runs, b: Runs, a_is_fixed: bool = False, b_is_fixed: bool = False
) -> PairedDifference:
    """A minus B over the same questions (see the module docstring).

    Args:
        a, b: each method's per-question outcomes, one row per run (seed), the same questions in the same order.
        a_is_fixed, b_is_fixed: the method has no run-to-run variance (scored once, untrained).

    Raises:
        ValueError: if the runs do not cover the same questions or there are fewer than two questions.
    """
    ya, yb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if (
        ya.ndim != 2
        or yb.ndim != 2
        or ya.shape[1] != yb.shape[1]
        or ya.shape[1] < 2
        or not len(ya)
        or not len(yb)
    ):
        raise ValueError("both methods need runs over the same (at least two) questions")
    per_question = ya.mean(axis=0) - yb.mean(axis=0)
    questions = per_question.shape[0]
    se_questions = float(per_question.std(ddof=1)) / math.sqrt(questions)
    terms = []
    for runs, fixed in ((ya, a_is_fixed), (yb, b_is_fixed)):
        if fixed:
            terms.append(0.0)
        elif len(runs) < 2:
            terms.append(None)
        else:
            terms.append(run_variance(runs) / len(runs))
    se_runs = None if None in terms else math.sqrt(sum(terms))
    return PairedDifference(float(per_question.mean()), se_questions, se_runs, questions, len(ya), len(yb))


def bootstrap_se(a: Runs, b: Runs, draws: int = 2000, seed: int = 0) -> float:
    """The standard error of A's mean minus B's by a two-way bootstrap: each draw resamples the questions
    (the same ones for both methods: paired) and, for each method, its runs, with replacement."""
    generator = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    questions = a.shape[1]
    estimates = np.empty(draws)
    for i in range(draws):
        picked = generator.integers(0, questions, questions)
        means = [runs[generator.integers(0, len(runs), len(runs))][:, picked].mean() for runs in (a, b)]
        estimates[i] = means[0] - means[1]
    return float(estimates.std(ddof=1))
