"""Evaluation of Bitune models with lm-evaluation-harness: the ``bitune`` model type (harness.py), the
paper's tasks (lm_eval_tasks/), continuation scoring with one prefill per prompt (scoring.py) and the
tables (report.py). Importing `bitune.evaluation.harness` registers the model type with lm-eval."""

from .scoring import ContinuationRequest, score_continuations

__all__ = ["ContinuationRequest", "score_continuations"]
