"""The noise module: x_hat = N1 * x + N2 with per-feature statistics of the tokens.

N1 = 1 + s * sigma * eps1 and N2 = mu + s * sigma * eps2, eps ~ N(0, 1) per element, so

    x_hat = x + mu + s * sigma * (eps1 * x + eps2)

mu and sigma are the mean and (population) standard deviation of each feature over the unmasked
tokens of this rank ('local') or of the data-parallel group ('global', like SyncBatchNorm).
Statistics and noise are computed in fp32 whatever the activation dtype: bf16 has too few mantissa
bits for a variance over 10^4 tokens.

Shapes: T tokens, D features.
"""

from typing import Optional, Tuple

import torch
import torch.distributed as torch_dist
from torch import nn


def draw_eps(x_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """eps1, eps2 ~ N(0, 1) in fp32: the numbers of one [2, T, D] draw, so every path consumes the
    RNG alike. On the CPU, where T * D is a multiple of 16, two draws give those numbers (torch fills
    normals in blocks of 16; tested) as two tensors that can be freed one at a time; CUDA's
    generator would give other numbers for two draws, so it keeps the one draw."""
    shape = tuple(x_TD.shape)
    if x_TD.device.type == "cpu" and x_TD.numel() % 16 == 0:
        return tuple(torch.randn(shape, device=x_TD.device, dtype=torch.float32) for _ in range(2))
    return torch.randn((2, ) + shape, device=x_TD.device, dtype=torch.float32).unbind(0)


def noisy_copy(x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
               eps2_TD: torch.Tensor) -> torch.Tensor:
    """x_hat = x + mu + scale * (eps1 * x + eps2), scale = s * sigma, in fp32, returned in x's dtype."""
    x = x_TD.float()
    return (x + mu_D + scale_D * (eps1_TD * x + eps2_TD)).to(x_TD.dtype)


def expected_copy(x_TD: torch.Tensor, mu_D: torch.Tensor) -> torch.Tensor:
    """x + mu, the noisy copy's expectation (eval_noise 'mean', or noise_scale 0), in x's dtype."""
    return (x_TD.float() + mu_D).to(x_TD.dtype)


def noisy_concat(x_TD: torch.Tensor, mu_D: torch.Tensor, scale_D: torch.Tensor, eps1_TD: torch.Tensor,
                 eps2_TD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """([x; x_hat] along the token axis, x_hat): both paths in one buffer for one dispatch."""
    x_hat_TD = noisy_copy(x_TD, mu_D, scale_D, eps1_TD, eps2_TD)
    return torch.cat([x_TD, x_hat_TD], dim=0), x_hat_TD


class GaussianNoise(nn.Module):
    """Makes the noise-augmented copy x_hat of the tokens. Holds no parameters.

    `stats_group` is the process group 'global' statistics are all-reduced over; the owning layer
    sets it when DeepSpeed creates its process groups. None means the default group.
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
            var_D = self._all_reduce((x - mu_D).square_().sum(0)) / count
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
            return expected_copy(x_TD, mu_D)
        return noisy_copy(x_TD, mu_D, self.noise_scale * sigma_D, *draw_eps(x_TD))
