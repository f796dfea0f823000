"""Language models; no parallelism, no data, no training."""

from .transformer import LanguageModel, LMOutput

__all__ = ["LanguageModel", "LMOutput"]
