"""Evaluation: full-split metrics, FLOPs accounting, what the experts learned, plots."""

from .lm_eval import evaluate_lm, evaluate_split

__all__ = ["evaluate_lm", "evaluate_split"]
