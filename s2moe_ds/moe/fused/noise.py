"""method.noise.noisy_concat as one autograd Function (Shapes: T tokens, D features)."""

from typing import Optional, Tuple

import torch


class _NoisyConcat(torch.autograd.Function):
    """([x; x_hat], x_hat) with x_hat = x + mu + scale * (eps1 * x + eps2), mu and scale constants,
    computed as x * slope + shift with slope = 1 + scale * eps1 and shift = mu + scale * eps2: three
    passes over [T, D] where the plain graph makes five, and slope is d x_hat / d x for backward,
    where the plain graph keeps the whole [2, T, D] noise draw alive.

    x_hat also comes out on its own: the InfoNCE loss reads rows of it, and a gradient into a
    slice of the [2T, D] buffer would make autograd materialise a zero [2T, D] gradient for it.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                eps2_TD: torch.Tensor):
        ctx.set_materialize_grads(False)  # an unused x_hat (uncertainty_on 'output') costs no zeros
        T = x_TD.shape[0]
        # In the noise's own buffers: the draw is not needed afterwards (the caller's contract).
        slope_TD = torch.addcmul(torch.ones((), dtype=eps1_TD.dtype, device=eps1_TD.device), eps1_TD, scale_D,
                                 out=eps1_TD)
        x_hat32_TD = torch.addcmul(mu_D, eps2_TD, scale_D, out=eps2_TD).addcmul_(x_TD, slope_TD)
        both_2TD = x_TD.new_empty((2 * T, ) + tuple(x_TD.shape[1:]))
        both_2TD[:T].copy_(x_TD)
        both_2TD[T:].copy_(x_hat32_TD)
        ctx.save_for_backward(slope_TD)
        return both_2TD, x_hat32_TD.to(x_TD.dtype)

    @staticmethod
    def backward(ctx, grad_2TD: Optional[torch.Tensor], grad_hat_TD: Optional[torch.Tensor]):
        (slope_TD, ) = ctx.saved_tensors
        T = slope_TD.shape[0]
        if grad_2TD is None:
            return (grad_hat_TD.float() * slope_TD).to(grad_hat_TD.dtype), None, None, None, None
        grad_hat32_TD = grad_2TD[T:].float()
        if grad_hat_TD is not None:
            grad_hat32_TD = grad_hat32_TD + grad_hat_TD.float()
        grad_x_TD = torch.addcmul(grad_2TD[:T].float(), grad_hat32_TD, slope_TD).to(grad_2TD.dtype)
        return grad_x_TD, None, None, None, None


def noisy_concat(x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                 eps2_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(torch.cat([x, x_hat]), x_hat) for constant mu and scale = s * sigma (detached statistics).
    Overwrites eps1 and eps2 (fp32, from method.draw_eps): they become d x_hat / d x and x_hat."""
    return _NoisyConcat.apply(x_TD, mu_D, scale_D, eps1_TD, eps2_TD)
