"""Evaluation: full-split metrics, FLOPs accounting, what the experts learned, plots."""

from .classification import evaluate_classifier
from .lm_eval import evaluate_lm, evaluate_split

__all__ = ["evaluate_classifier", "evaluate_lm", "evaluate_split"]
