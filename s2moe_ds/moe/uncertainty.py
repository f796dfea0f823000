"""The S2MoE uncertainty loss: InfoNCE between each token and its own noisy copy.

L_u = mean_i CE(softmax_j(cos(a_i, b_j) / tau), target = i): b_i is a_i's positive and the other
rows of b are its negatives. The loss is computed on a sample of at most `max_tokens` rows, so its
memory is max_tokens^2, never T^2 for the full token count.

`info_nce_fused` (the layer's default) computes the same loss and already its gradients in the
forward pass, when the N x N softmax is at hand, and keeps only the two [N, D] gradients for
backward; `info_nce` is the plain autograd graph it is tested against, which keeps the N x N
log-probabilities until backward (docs/performance.md has the measured effect).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_NORM_EPS = 1e-12  # F.normalize's default: rows are divided by max(|x|, eps)


def info_nce(anchor_ND: torch.Tensor, positive_ND: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over N paired rows, computed in fp32 or the inputs' wider dtype (bf16 logits over
    hundreds of negatives would round the softmax away)."""
    dtype = torch.promote_types(anchor_ND.dtype, torch.float32)
    a_ND = F.normalize(anchor_ND.to(dtype), dim=-1)
    b_ND = F.normalize(positive_ND.to(dtype), dim=-1)
    logits_NN = (a_ND @ b_ND.t()) / tau
    target_N = torch.arange(a_ND.shape[0], device=a_ND.device)
    return F.cross_entropy(logits_NN, target_N)


def _normalize(x_ND: torch.Tensor) -> tuple:
    norm_N1 = x_ND.norm(dim=-1, keepdim=True)
    return x_ND / norm_N1.clamp_min(_NORM_EPS), norm_N1


def _normalize_backward(grad_u_ND: torch.Tensor, u_ND: torch.Tensor, norm_N1: torch.Tensor) -> torch.Tensor:
    """The gradient through u = x / max(|x|, eps): the part of grad_u along u drops out where the
    norm is above eps (scaling x leaves u unchanged); below it u is x / eps, a plain scaling."""
    radial_N1 = (grad_u_ND * u_ND).sum(-1, keepdim=True) * (norm_N1 > _NORM_EPS)
    return (grad_u_ND - u_ND * radial_N1) / norm_N1.clamp_min(_NORM_EPS)


class _InfoNCE(torch.autograd.Function):
    """info_nce with its gradients computed in forward: d L / d logits = (softmax - I) / N, so the
    two [N, D] input gradients cost two matmuls there and the N x N matrices die with the forward.
    The loss is a scalar, so backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, anchor_ND: torch.Tensor, positive_ND: torch.Tensor, tau: float) -> torch.Tensor:
        dtype = torch.promote_types(anchor_ND.dtype, torch.float32)
        a_ND, a_norm_N1 = _normalize(anchor_ND.to(dtype))
        b_ND, b_norm_N1 = _normalize(positive_ND.to(dtype))
        logits_NN = torch.mm(a_ND, b_ND.t()).mul_(1.0 / tau)
        loss = -torch.log_softmax(logits_NN, dim=1).diagonal().mean()
        ctx.input_dtypes = (anchor_ND.dtype, positive_ND.dtype)
        grad_a_ND = grad_b_ND = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            N = a_ND.shape[0]
            grad_logits_NN = torch.softmax(logits_NN, dim=1)
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


def info_nce_fused(anchor_ND: torch.Tensor, positive_ND: torch.Tensor, tau: float) -> torch.Tensor:
    """info_nce's value and gradients, with the gradients computed in forward (see _InfoNCE).
    Computing them is wasted if the loss is never backpropagated, so only call it under grad
    when it will be; it supports no double backward."""
    return _InfoNCE.apply(anchor_ND, positive_ND, tau)


def sample_rows(num_rows: int, max_rows: int, mask_T: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Indices of at most max_rows unmasked rows, drawn without replacement.

    Returns None when every row is used as is (no mask, few rows): then no random numbers are
    drawn. The loss is invariant to the order of the rows, so taking all of them needs no shuffle.
    """
    if mask_T is None:
        if num_rows <= max_rows:
            return None
        return torch.randperm(num_rows, device=device)[:max_rows]
    valid_V = torch.nonzero(mask_T.reshape(-1) > 0, as_tuple=False).squeeze(1)
    if valid_V.numel() > max_rows:
        valid_V = valid_V[torch.randperm(valid_V.numel(), device=device)[:max_rows]]
    return valid_V


def sampled_info_nce(anchor_TD: torch.Tensor, positive_TD: torch.Tensor, tau: float, max_tokens: int,
                     mask_T: Optional[torch.Tensor] = None, fused: bool = False) -> torch.Tensor:
    """InfoNCE on a shared random sample of at most max_tokens unmasked rows of both tensors;
    fused=True uses info_nce_fused (same value and gradients, less memory)."""
    idx_N = sample_rows(anchor_TD.shape[0], max_tokens, mask_T, anchor_TD.device)
    if idx_N is not None:
        if idx_N.numel() < 2:
            # One token has no negatives: the loss is log(1) = 0 whatever the inputs.
            return anchor_TD.new_zeros((), dtype=torch.float32)
        anchor_TD, positive_TD = anchor_TD[idx_N], positive_TD[idx_N]
    return (info_nce_fused if fused else info_nce)(anchor_TD, positive_TD, tau)
