"""Evaluation: full-split metrics, FLOPs accounting, what the experts learned, plots, comparisons."""

from .lm_eval import evaluate_split

__all__ = ["evaluate_split"]
