"""The mixing gate: one scalar per token that weighs the clean path against the noisy one.

    g = sigmoid(w^T x + b)            fp32; w starts at 0, so g starts at sigmoid(b)
    out = g * y + (1 - g) * y_hat     y = SMoE(x), y_hat = SMoE(x_hat), in fp32, returned in y's dtype

Shapes: T tokens, D features; y_2TD = [y; y_hat] is the dispatch's output for both paths.
"""

import torch
import torch.nn.functional as F


def mix_gate_logit(x_TD: torch.Tensor, weight_1D: torch.Tensor, bias_1: torch.Tensor) -> torch.Tensor:
    """w^T x + b in fp32, for x of any dtype."""
    return F.linear(x_TD.float(), weight_1D.float(), bias_1.float())


def mix_paths(g_T1: torch.Tensor, y_2TD: torch.Tensor) -> torch.Tensor:
    """g * y + (1 - g) * y_hat for y_2TD = [y; y_hat]."""
    y_TD, y_hat_TD = y_2TD.chunk(2, dim=0)
    return (g_T1 * y_TD.float() + (1.0 - g_T1) * y_hat_TD.float()).to(y_2TD.dtype)
