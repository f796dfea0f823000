"""s2moe-ds: S2MoE mixture-of-experts language models trained with DeepSpeed."""

__version__ = "0.2.0"
