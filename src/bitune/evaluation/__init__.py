"""Evaluation of Bitune models with lm-evaluation-harness: the ``bitune`` model type (harness.py), the
paper's tasks (lm_eval_tasks/, named in tasks.py), continuation scoring with one prefill per prompt
(scoring.py), `bitune eval` (runner.py) and the tables (tables.py). Importing
`bitune.evaluation.harness` registers the model type with lm-eval."""

from .scoring import ContinuationRequest, score_continuations

__all__ = ["ContinuationRequest", "score_continuations"]
