"""The S2MoE math and its DeepSpeed wiring. Imports torch and deepspeed only."""

from .experts import FFN
from .factory import DenseFFN, build_ffn_block
from .gate import EvalDeterministicGate, install_eval_deterministic_gate
from .layer import S2MoE, S2MoEOutput
from .noise import GaussianNoise
from .uncertainty import info_nce, info_nce_fused, sampled_info_nce

__all__ = [
    "FFN", "DenseFFN", "build_ffn_block", "EvalDeterministicGate", "install_eval_deterministic_gate", "S2MoE",
    "S2MoEOutput", "GaussianNoise", "info_nce", "info_nce_fused", "sampled_info_nce"
]
