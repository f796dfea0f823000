"""x W^T + b in fp32 for x of any dtype, keeping x itself for backward (T tokens, D features,
O outputs): the mixing gate's logit and the routers' logits.

The plain F.linear(x.float(), W.float()) keeps x's fp32 copy, twice the bytes of a bf16 x (for a
router, on the 2T tokens of S2MoE's two paths). Casting bf16 to fp32 is exact, so the values and
gradients are the plain ones; in fp32 the two are the same graph.
"""

from typing import Optional

import torch
import torch.nn.functional as F


class _Fp32Linear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_OD: torch.Tensor, bias_O: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_OD)
        ctx.bias_dtype = None if bias_O is None else bias_O.dtype
        return F.linear(x_TD.float(), weight_OD.float(), None if bias_O is None else bias_O.float())

    @staticmethod
    def backward(ctx, grad_TO: torch.Tensor):
        x_TD, weight_OD = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w32_OD = weight_OD.float()
            # One output: an outer product, with no sum to run.
            grad_x = (grad_TO * w32_OD if w32_OD.shape[0] == 1 else grad_TO @ w32_OD).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_TO.t() @ x_TD.float()).to(weight_OD.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_TO.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def fp32_linear(x_TD: torch.Tensor, weight_OD: torch.Tensor, bias_O: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x.float(), weight.float(), bias.float()) that keeps x, not its fp32 copy."""
    return _Fp32Linear.apply(x_TD, weight_OD, bias_O)
