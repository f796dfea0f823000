"""The S2MoE noise module: x_hat = N1 * x + N2 with per-feature statistics of the tokens.

N1 = 1 + s * sigma * eps1 and N2 = mu + s * sigma * eps2, eps ~ N(0, 1) per element, so
x_hat = x + mu + s * sigma * (eps1 * x + eps2). Statistics and noise are computed in fp32 whatever
the activation dtype: bf16 has too few mantissa bits for a variance over 10^4 tokens.

The layer needs x and x_hat side by side in one [2T, D] buffer (one dispatch for both paths).
`noisy_concat` builds that buffer directly (fused, the default) and keeps for backward only the
slope d x_hat / d x = 1 + s * sigma * eps1, where the plain graph keeps the whole [2, T, D] noise
draw alive until backward (docs/performance.md has the measured effect). The fused path covers
the training case (sampled noise, detached statistics); anything else takes the plain path,
which stays as the reference.
"""

from typing import Optional, Tuple

import torch
import torch.distributed as torch_dist
from torch import nn


class _NoisyConcat(torch.autograd.Function):
    """([x; x_hat], x_hat) with x_hat = x + mu + scale * (eps1 * x + eps2), mu and scale constants,
    computed as x * slope + shift with slope = 1 + scale * eps1 and shift = mu + scale * eps2: three
    passes over [T, D] where the plain graph makes five, and slope is d x_hat / d x for backward.

    x_hat also comes out on its own: the InfoNCE loss reads rows of it, and a gradient into a
    slice of the [2T, D] buffer would make autograd materialise a zero [2T, D] gradient for it.
    """

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                eps2_TD: torch.Tensor):
        ctx.set_materialize_grads(False)  # an unused x_hat (uncertainty_on 'output') costs no zeros
        T = x_TD.shape[0]
        slope_TD = torch.addcmul(torch.ones((), dtype=eps1_TD.dtype, device=eps1_TD.device), eps1_TD, scale_D)
        x_hat32_TD = torch.addcmul(mu_D, eps2_TD, scale_D).addcmul_(x_TD.float(), slope_TD)
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


def noisy_concat_fused(x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                       eps2_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(torch.cat([x, x_hat]), x_hat) for constant mu and scale = s * sigma (see _NoisyConcat)."""
    return _NoisyConcat.apply(x_TD, mu_D, scale_D, eps1_TD, eps2_TD)


def noisy_copy_plain(x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                     eps2_TD: torch.Tensor) -> torch.Tensor:
    """x_hat = x + mu + scale * (eps1 * x + eps2) in fp32, returned in x's dtype: the formula as
    autograd sees it."""
    x = x_TD.float()
    return (x + mu_D + scale_D * (eps1_TD * x + eps2_TD)).to(x_TD.dtype)


def noisy_concat_plain(x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                       eps2_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference noisy_concat_fused is tested against."""
    x_hat_TD = noisy_copy_plain(x_TD, mu_D, scale_D, eps1_TD, eps2_TD)
    return torch.cat([x_TD, x_hat_TD], dim=0), x_hat_TD


def _draw_eps(x_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """eps1, eps2 ~ N(0, 1) in fp32, one draw for both, so every path consumes the RNG alike."""
    return torch.randn((2, ) + tuple(x_TD.shape), device=x_TD.device, dtype=torch.float32).unbind(0)


class GaussianNoise(nn.Module):
    """Makes the noise-augmented copy x_hat of the tokens. Holds no parameters.

    `stats_group` is the process group the 'global' statistics are all-reduced over; the owning
    layer sets it when DeepSpeed creates its process groups. None means the default group.
    """

    def __init__(self, noise_scale: float, noise_stats: str, detach_noise_stats: bool) -> None:
        super().__init__()
        self.noise_scale = noise_scale
        self.noise_stats = noise_stats
        self.detach_noise_stats = detach_noise_stats
        self.stats_group = None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not (self.noise_stats == "global" and torch_dist.is_available() and torch_dist.is_initialized()):
            return t
        if t.requires_grad:
            # The differentiable all-reduce sums gradients across ranks in backward, as
            # SyncBatchNorm does; only needed when the statistics are not detached.
            from torch.distributed.nn.functional import all_reduce
            return all_reduce(t, group=self.stats_group)
        t = t.clone()
        torch_dist.all_reduce(t, group=self.stats_group)
        return t

    def statistics(self, x_TD: torch.Tensor, mask_T: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and (population) standard deviation over the unmasked tokens, fp32."""
        x = x_TD.float()
        if self.detach_noise_stats:
            x = x.detach()
        # count, then sum: two-pass (mean first, then squared deviations) keeps the variance
        # accurate where E[x^2] - E[x]^2 would cancel catastrophically.
        if mask_T is None:
            # Every token weighs 1: the same sums without two multiplications by a ones vector.
            count = self._all_reduce(x.new_tensor(float(x.shape[0]))).clamp_min(1.0)
            mu_D = self._all_reduce(x.sum(0)) / count
            var_D = self._all_reduce((x - mu_D).square().sum(0)) / count
            return mu_D, var_D.sqrt()
        w_T1 = mask_T.reshape(-1, 1).to(x.dtype)
        count = self._all_reduce(w_T1.sum()).clamp_min(1.0)
        mu_D = self._all_reduce((x * w_T1).sum(0)) / count
        var_D = self._all_reduce((((x - mu_D) ** 2) * w_T1).sum(0)) / count
        return mu_D, var_D.sqrt()

    def forward(self, x_TD: torch.Tensor, mask_T: Optional[torch.Tensor] = None,
                sample: bool = True) -> torch.Tensor:
        """x_hat for the tokens x_TD; with sample=False the expectation x + mu (eval_noise 'mean')."""
        mu_D, sigma_D = self.statistics(x_TD, mask_T)
        if not sample or self.noise_scale == 0:
            return (x_TD.float() + mu_D).to(x_TD.dtype)
        return noisy_copy_plain(x_TD, mu_D, self.noise_scale * sigma_D, *_draw_eps(x_TD))

    def noisy_concat(self, x_TD: torch.Tensor, mask_T: Optional[torch.Tensor] = None, sample: bool = True,
                     fused: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """(torch.cat([x, x_hat]) along the token axis, x_hat), x_hat as forward() makes it (same
        draws); fused=False builds them with the plain autograd graph."""
        if not (fused and sample and self.noise_scale != 0 and self.detach_noise_stats):
            x_hat_TD = self(x_TD, mask_T, sample=sample)
            return torch.cat([x_TD, x_hat_TD], dim=0), x_hat_TD
        mu_D, sigma_D = self.statistics(x_TD, mask_T)
        return noisy_concat_fused(x_TD, mu_D, self.noise_scale * sigma_D, *_draw_eps(x_TD))
