"""method.mixing's gate logit (fused.linear's fp32 linear) and path mix as autograd Functions (T
tokens, D features)."""

import torch

from .linear import fp32_linear


class _MixPaths(torch.autograd.Function):
    """g * y + (1 - g) * y_hat from the [2T, D] expert output, computed in fp32 as
    y_hat + g * (y - y_hat).

    It keeps y - y_hat (one [T, D]) for the gradient of g where the plain graph keeps y and y_hat
    (the whole [2T, D] output), and its backward writes the gradients of both halves straight into
    one [2T, D] buffer instead of concatenating two.
    """

    @staticmethod
    def forward(ctx, g_T1: torch.Tensor, y_2TD: torch.Tensor) -> torch.Tensor:
        y_TD, y_hat_TD = y_2TD.chunk(2, dim=0)
        y_hat32_TD = y_hat_TD.float()
        diff32_TD = y_TD.float() - y_hat32_TD
        ctx.save_for_backward(g_T1, diff32_TD)
        return torch.addcmul(y_hat32_TD, diff32_TD, g_T1).to(y_2TD.dtype)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        g_T1, diff32_TD = ctx.saved_tensors
        T = grad_TD.shape[0]
        grad32_TD = grad_TD.float()
        grad_2TD = grad_TD.new_empty((2 * T, ) + tuple(grad_TD.shape[1:]))
        grad_2TD[:T].copy_(grad32_TD * g_T1)
        grad_2TD[T:].copy_(grad32_TD * (1.0 - g_T1))
        grad_g_T1 = (grad32_TD * diff32_TD).sum(-1, keepdim=True)
        return grad_g_T1, grad_2TD


def mix_gate_logit(x_TD: torch.Tensor, weight_1D: torch.Tensor, bias_1: torch.Tensor) -> torch.Tensor:
    return fp32_linear(x_TD, weight_1D, bias_1)


def mix_paths(g_T1: torch.Tensor, y_2TD: torch.Tensor) -> torch.Tensor:
    return _MixPaths.apply(g_T1, y_2TD)
