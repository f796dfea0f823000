"""The formulas of `method/` as autograd Functions: the same values and gradients (tests hold them
equal to method/'s), with less kept for backward and fewer passes over the activations.
docs/performance.md has what each saves. The layer uses them when `S2MoEConfig.fused` is true.
"""

from .infonce import info_nce
from .linear import fp32_linear
from .mixing import mix_gate_logit, mix_paths
from .noise import noisy_concat

__all__ = ["fp32_linear", "info_nce", "mix_gate_logit", "mix_paths", "noisy_concat"]
