"""Evaluation of Bitune models: continuation scoring with one prefill per prompt, task accuracy."""

from .accuracy import evaluate_task, load_for_evaluation
from .scoring import ContinuationRequest, score_continuations

__all__ = ["ContinuationRequest", "evaluate_task", "load_for_evaluation", "score_continuations"]
