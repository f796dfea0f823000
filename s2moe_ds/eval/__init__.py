"""Evaluation: validation/test metrics (and, later, FLOPs accounting and collapse analysis)."""

from .lm_eval import evaluate_split

__all__ = ["evaluate_split"]
