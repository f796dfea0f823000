"""S2MoE's formulas, plain: what docs/method.md specifies, as autograd records it.

    noise.py     x_hat = x + mu + s * sigma * (eps1 * x + eps2), mu and sigma per feature
    mixing.py    g = sigmoid(w^T x + b) in fp32; out = g * y + (1 - g) * y_hat
    infonce.py   L_u = InfoNCE(x, x_hat) on a sample of tokens

`fused/` has the same functions as autograd Functions that keep less for backward; the layer picks
one of the two by `S2MoEConfig.fused`, and tests hold them equal.
"""

from .infonce import SIMILARITIES, gathered_info_nce, info_nce, sample_rows, sampled_info_nce, similarity
from .mixing import mix_gate_logit, mix_paths
from .noise import GaussianNoise, draw_eps, expected_copy, noisy_concat, noisy_copy

__all__ = ["SIMILARITIES", "GaussianNoise", "draw_eps", "expected_copy", "gathered_info_nce", "info_nce", "mix_gate_logit", "mix_paths", "noisy_concat", "noisy_copy",
           "sample_rows", "sampled_info_nce", "similarity"]
