"""The paired standard error with the run-level term, on constructed data whose variance is known."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from bitune.evaluation.stats import bootstrap_se, paired_difference, run_variance

QUESTIONS, SEEDS = 400, 3
SIGMA_RUN, SIGMA_NOISE, SIGMA_QUESTION = 0.05, 0.3, 0.2


def experiment(generator, shift: float = 0.0):
    """Two methods over the same questions: outcome = question difficulty + the run's shift + noise."""
    difficulty = generator.normal(0.5, SIGMA_QUESTION, QUESTIONS)

    def runs(offset):
        shifts = generator.normal(offset, SIGMA_RUN, (SEEDS, 1))
        return difficulty + shifts + generator.normal(0, SIGMA_NOISE, (SEEDS, QUESTIONS))

    return runs(shift), runs(0.0)


def test_the_standard_error_with_runs_matches_the_known_variance_and_the_paired_one_falls_short():
    generator = np.random.default_rng(0)
    true_se = math.sqrt(2 * SIGMA_RUN**2 / SEEDS + 2 * SIGMA_NOISE**2 / (SEEDS * QUESTIONS))
    results = [paired_difference(*experiment(generator, shift=0.02)) for _ in range(300)]
    differences = [r.difference for r in results]
    assert statistics.fmean(differences) == pytest.approx(0.02, abs=0.01)
    assert statistics.stdev(differences) == pytest.approx(true_se, rel=0.15)  # the simulation agrees
    assert math.sqrt(statistics.fmean(r.se**2 for r in results)) == pytest.approx(true_se, rel=0.2)
    paired_only = math.sqrt(statistics.fmean(r.se_questions**2 for r in results))
    assert paired_only == pytest.approx(math.sqrt(2 * SIGMA_NOISE**2 / (SEEDS * QUESTIONS)), rel=0.1)
    assert paired_only < 0.5 * true_se  # the run-level term dominates here: pairing alone is far too sure
    covered = sum(lo <= 0.02 <= hi for lo, hi in (r.interval() for r in results)) / len(results)
    assert covered > 0.85


def test_run_variance_recovers_the_component_and_is_zero_without_run_effects():
    generator = np.random.default_rng(1)
    estimates = [run_variance(experiment(generator)[0]) for _ in range(300)]
    assert statistics.fmean(estimates) == pytest.approx(SIGMA_RUN**2, rel=0.3)
    same_runs = np.tile(generator.integers(0, 2, QUESTIONS), (SEEDS, 1))  # identical runs
    assert run_variance(same_runs) == 0.0


def test_a_fixed_method_adds_no_run_term_and_one_trained_seed_leaves_it_unknown():
    a = [[1, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 1]]
    fixed = [[1, 0, 0, 1]]
    result = paired_difference(a, fixed, b_is_fixed=True)
    assert result.difference == pytest.approx(statistics.fmean(map(statistics.fmean, a)) - 0.5)
    assert result.se_runs == pytest.approx(math.sqrt(run_variance(a) / 3))
    unknown = paired_difference(a, fixed)
    assert unknown.se is None and unknown.interval() is None and unknown.detectable is None
    assert result.detectable == pytest.approx(2.8016 * result.se, rel=1e-3)
    with pytest.raises(ValueError, match="same"):
        paired_difference(a, [[1, 0]])


def test_the_two_way_bootstrap_agrees_with_the_formula():
    generator = np.random.default_rng(2)
    a, b = experiment(generator, shift=0.02)
    formula = paired_difference(a, b).se
    # with 3 seeds, resampling runs shrinks their variance by (S - 1) / S
    assert bootstrap_se(a, b, draws=1000) == pytest.approx(formula * math.sqrt((SEEDS - 1) / SEEDS), rel=0.35)
