"""method.infonce.info_nce as one autograd Function that computes its gradients in forward.

The plain graph keeps the N x N log-probabilities until backward; this keeps only the two [N, D]
input gradients (N sampled rows, D features).
"""

import torch
from torch.autograd.function import once_differentiable

_NORM_EPS = 1e-12  # F.normalize's default: rows are divided by max(|x|, eps)
_LOG_OF_SOFTMAX_MIN_TAU = 0.05
"""Cosine logits lie in [-1/tau, 1/tau], so a softmax entry is at least exp(-2/tau) / N: for tau
>= 0.05 that is >= e^-40 / N, far from fp32's underflow, and its log is as exact as log_softmax."""


def _normalize(x_ND: torch.Tensor) -> tuple:
    norm_N1 = x_ND.norm(dim=-1, keepdim=True)
    return x_ND / norm_N1.clamp_min(_NORM_EPS), norm_N1


def _normalize_backward(grad_u_ND: torch.Tensor, u_ND: torch.Tensor, norm_N1: torch.Tensor) -> torch.Tensor:
    """The gradient through u = x / max(|x|, eps): the part of grad_u along u drops out where the
    norm is above eps (scaling x leaves u unchanged); below it u is x / eps, a plain scaling."""
    radial_N1 = (grad_u_ND * u_ND).sum(-1, keepdim=True) * (norm_N1 > _NORM_EPS)
    return (grad_u_ND - u_ND * radial_N1) / norm_N1.clamp_min(_NORM_EPS)


class _InfoNCE(torch.autograd.Function):
    """method.info_nce with its gradients computed in forward: d L / d logits = (softmax - I) / N, so the
    two [N, D] input gradients cost two matmuls there and the N x N matrices die with the forward.
    The loss is a scalar, so backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, anchor_ND: torch.Tensor, positive_ND: torch.Tensor, tau: float) -> torch.Tensor:
        dtype = torch.promote_types(anchor_ND.dtype, torch.float32)
        a_ND, a_norm_N1 = _normalize(anchor_ND.to(dtype))
        b_ND, b_norm_N1 = _normalize(positive_ND.to(dtype))
        logits_NN = torch.mm(a_ND, b_ND.t()).mul_(1.0 / tau)
        ctx.input_dtypes = (anchor_ND.dtype, positive_ND.dtype)
        grad_a_ND = grad_b_ND = None
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            ctx.save_for_backward(grad_a_ND, grad_b_ND)
            return -torch.log_softmax(logits_NN, dim=1).diagonal().mean()
        N = a_ND.shape[0]
        grad_logits_NN = torch.softmax(logits_NN, dim=1)
        if tau >= _LOG_OF_SOFTMAX_MIN_TAU:
            # The loss from the softmax the gradient needs anyway: one pass over N x N fewer.
            loss = -grad_logits_NN.diagonal().log().mean()
        else:
            loss = -torch.log_softmax(logits_NN, dim=1).diagonal().mean()
        grad_logits_NN.diagonal().sub_(1.0)
        grad_logits_NN.mul_(1.0 / (N * tau))  # 1/tau: the logits' own scale
        if ctx.needs_input_grad[0]:
            grad_a_ND = _normalize_backward(torch.mm(grad_logits_NN, b_ND), a_ND, a_norm_N1)
        if ctx.needs_input_grad[1]:
            grad_b_ND = _normalize_backward(torch.mm(grad_logits_NN.t(), a_ND), b_ND, b_norm_N1)
        ctx.save_for_backward(grad_a_ND, grad_b_ND)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_a_ND, grad_b_ND = ctx.saved_tensors
        dtype_a, dtype_b = ctx.input_dtypes
        return (None if grad_a_ND is None else (grad_a_ND * grad_loss).to(dtype_a),
                None if grad_b_ND is None else (grad_b_ND * grad_loss).to(dtype_b), None)


def info_nce(anchor_ND: torch.Tensor, positive_ND: torch.Tensor, tau: float) -> torch.Tensor:
    """method.info_nce's value and gradients, with the gradients computed in forward (see _InfoNCE).
    Computing them is wasted if the loss is never backpropagated, so only call it under grad
    when it will be; it supports no double backward."""
    return _InfoNCE.apply(anchor_ND, positive_ND, tau)
