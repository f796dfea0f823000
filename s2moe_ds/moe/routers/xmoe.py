"""'xmoe': X-MoE's router (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of
Experts"): routing scores on a low-dimensional hypersphere.

    h = W x                          W: d_model -> xmoe_dim (8 to 16), no bias
    s_e = cos(h, c_e) / tau          c_e: one embedding per expert, L2-normalised in the score
    top-k of softmax(s)              DeepSpeed's gating (capacity, drops, dispatch)

tau is learned, from xmoe_temperature. The balance loss reads the cosine scores at a temperature
of its own (xmoe_balance_temperature), as X-MoE's implementation does. Scaling a token changes
nothing (the score is a cosine), and no logit exceeds 1 / tau.

With `xmoe_sister`, the variant of the S2MoE authors' sister code (and of X-MoE's public code):
the projected token is not normalised, the expert embeddings are rescaled to norm 1.5 before every
forward, and the scores have no temperature; their setting adds xmoe_dim 8 and
xmoe_balance_temperature 0.3.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check_bool, check_int, check_number
from ..routing import Routing
from ..spec import RouterSpec
from .base import Router, gshard_balance


@dataclass
class XMoERouterConfig:
    """X-MoE's routing settings."""

    xmoe_dim: int = 16
    """Dimension of the hypersphere the scores are computed on (the paper: 16; the sister code: 8)."""
    xmoe_temperature: float = 0.07
    """Initial routing temperature tau; learned unless xmoe_learn_temperature is false."""
    xmoe_learn_temperature: bool = True
    """Learn tau (the paper) or keep it fixed."""
    xmoe_balance_temperature: float = 0.07
    """Temperature of the softmax of the cosine scores in the balance loss (X-MoE's code: 0.07;
    the sister code: 0.3)."""
    xmoe_sister: bool = False
    """The sister code's variant: unnormalised projected tokens, expert embeddings rescaled to
    norm 1.5 before each forward, no routing temperature."""

    def __post_init__(self) -> None:
        p = "xmoe."
        check_int(self.xmoe_dim, p + "xmoe_dim", 1)
        check_number(self.xmoe_temperature, p + "xmoe_temperature", 0.0, strict=True)
        check_bool(self.xmoe_learn_temperature, p + "xmoe_learn_temperature")
        check_number(self.xmoe_balance_temperature, p + "xmoe_balance_temperature", 0.0, strict=True)
        check_bool(self.xmoe_sister, p + "xmoe_sister")


class XMoERouter(Router):

    kind = "xmoe"

    def __init__(self, model_dim: int, routing: Routing, settings: XMoERouterConfig) -> None:
        super().__init__(model_dim, routing)
        num_experts = routing.num_experts
        self.settings = settings
        self.projection = nn.Linear(model_dim, settings.xmoe_dim, bias=False)
        centroids = torch.empty(num_experts, settings.xmoe_dim)
        nn.init.orthogonal_(centroids, gain=0.32)
        # Named without "expert": DeepSpeed moves such state-dict keys into the per-expert files.
        self.centroids = nn.Parameter(centroids)
        # Shape [1], not a scalar: DeepSpeed's engine broadcasts parameters as byte views, which
        # 0-dim tensors refuse.
        log_tau = torch.full((1,), math.log(settings.xmoe_temperature))
        if settings.xmoe_learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    def cosine_scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32: the tokens' projections against the expert embeddings."""
        h_TR = F.linear(x_TD.float(), self.projection.weight.float())
        if self.settings.xmoe_sister:
            if self.training:
                # The sister code's weight constraint, applied in place before every training
                # forward as there: the one write a route makes (to a parameter, not to any state
                # of the call). Never in eval, where it would move the run's weights: the scores
                # below see the embeddings' directions only, so eval gives the same numbers.
                with torch.no_grad():
                    self.centroids.mul_(1.5 / self.centroids.norm(dim=1, keepdim=True))
            return h_TR @ F.normalize(self.centroids.float(), dim=1).t()
        return F.normalize(h_TR, dim=1) @ F.normalize(self.centroids.float(), dim=1).t()

    def route_logits(self, x_TD: torch.Tensor, token_ids_T=None, *, noisy: bool = False) -> torch.Tensor:
        scores_TE = self.cosine_scores(x_TD)
        return scores_TE if self.settings.xmoe_sister else scores_TE / self.log_temperature.exp().clamp_min(1e-4)

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
        tau = 1.0 if self.settings.xmoe_sister else self.log_temperature.exp().clamp_min(1e-4)
        probs_TE = F.softmax(logits_TE * tau / self.settings.xmoe_balance_temperature, dim=-1)
        return gshard_balance(probs_TE, logits_TE, k)


def build(router_cfg: XMoERouterConfig, moe_cfg, d_model: int, context=None) -> XMoERouter:
    return XMoERouter(d_model, Routing.of(moe_cfg), router_cfg)


def flops(router_cfg: XMoERouterConfig, moe_cfg, d_model: int, training: bool) -> int:
    return 2 * d_model * router_cfg.xmoe_dim + 2 * router_cfg.xmoe_dim * moe_cfg.num_experts


SPEC = RouterSpec(build=build, config=XMoERouterConfig, flops=flops)
