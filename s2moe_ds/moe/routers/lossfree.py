"""'lossfree': auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load
Balancing Strategy for Mixture-of-Experts"; the router of DeepSeek-V3).

    z = x W^T                          W: the linear router of 'topk' (DeepSpeed's gate's weight)
    s = f(z)                           f: sigmoid (DeepSeek-V3) or softmax over the experts
    experts = top-k of s + b           b: one bias per expert, a buffer, for the SELECTION only
    weight of a route to e = s_e       (divided by the sum over the token's kept routes if
                                        lossfree_normalize, as DeepSeek-V3)

No balance loss: the route's 'balance' is 0, so moe.balance_coef has no effect. The balance
comes from b instead: after each optimizer step, every expert's bias moves by u towards balance,

    b_e += u * sign(mean_e' load_e' - load_e)

with load_e the routes the step sent to e (before capacity drops) over every micro-batch of the
step and every rank: the trainer's LoadBalancingBias hook (train/hooks.py) sums the routes'
'expert_counts', all-reduces them and calls update_bias(counts). route() itself leaves nothing
behind. An overloaded expert's bias goes down, so fewer tokens select it next step; the bias
never enters the combine weights, so it pulls no gradient towards the overloaded expert.

b is a float32 buffer named selection_bias (never 'expert...', which DeepSpeed would move into the
per-expert files): saved with the model, loaded on resume and by the resharder like any non-expert
weight, equal on every rank (the same summed counts give the same update everywhere), unchanged
by eval-mode forwards. Capacity, drops and dispatch are DeepSpeed's gating on s + b, as for
every router; its Gumbel sampling of a second expert is off (noise of that size would swamp
scores in [0, 1] and the bias with them), its random token selection for top-1 as DeepSpeed's.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, check_bool, check_choice, check_number
from ...parallel import deepspeed_internals as ds
from .. import fused
from ..routing import Routing
from ..spec import RouterSpec
from .base import Router
from .route import Route

SCORE_FUNCTIONS = ("sigmoid", "softmax")


@dataclass
class LossFreeRouterConfig:
    """The loss-free balancing router's settings (the shared routing ones are MoEConfig's)."""

    lossfree_bias_rate: float = 0.001
    """u, the step of each expert's selection bias per optimizer step, towards balance: b_e +=
    u * sign(mean load - load_e). The paper's 0.001; 0 keeps the bias at 0 (top-k of the scores,
    no balancing at all)."""
    lossfree_score: str = "sigmoid"
    """The score function f of s = f(x W^T): 'sigmoid' (DeepSeek-V3, the paper's best) or
    'softmax' (over the experts, as the other routers)."""
    lossfree_normalize: bool = True
    """Divide each token's combine weights by their sum over its kept routes (DeepSeek-V3), so
    that they sum to 1; false: each route weighs s_e as it is. Needs moe.k >= 2 to train the
    router: with one route the weight is always 1."""

    def __post_init__(self) -> None:
        p = "lossfree."
        check_number(self.lossfree_bias_rate, p + "lossfree_bias_rate", 0.0, strict=False)
        check_choice(self.lossfree_score, p + "lossfree_score", SCORE_FUNCTIONS)
        check_bool(self.lossfree_normalize, p + "lossfree_normalize")


class LossFreeRouter(Router):
    """The linear router of 'topk' (the same weight name and initial weight), scored by
    lossfree_score, selecting by score plus the selection_bias buffer."""

    kind = "lossfree"

    def __init__(self, model_dim: int, routing: Routing, settings: LossFreeRouterConfig) -> None:
        super().__init__(model_dim, routing)
        self.settings = settings
        self.add_module(ds.GATE_LINEAR, nn.Linear(model_dim, routing.num_experts, bias=False))
        self.register_buffer("selection_bias", torch.zeros(routing.num_experts, dtype=torch.float32))

    @property
    def linear(self) -> nn.Linear:
        return getattr(self, ds.GATE_LINEAR)

    def start_from(self, deepspeed_gate: nn.Module) -> None:
        """DeepSpeed's gate's initial weight, as 'topk' takes it: a seed gives SMoE's initial router."""
        self.linear.load_state_dict(getattr(deepspeed_gate, ds.GATE_LINEAR).state_dict())

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """s = f(z), [T, E] fp32, in the graph."""
        if self.settings.lossfree_score == "sigmoid":
            return torch.sigmoid(logits_TE)
        return F.softmax(logits_TE, dim=-1)

    def route_logits(self, x_TD: torch.Tensor, token_ids_T=None, *, noisy: bool = False) -> torch.Tensor:
        return fused.fp32_linear(x_TD, self.linear.weight)

    def selection_logits(self, logits_TE: torch.Tensor) -> torch.Tensor:
        # Detached: the selection is a choice, not a weight; no gradient flows through the bias.
        return (self.scores(logits_TE) + self.selection_bias).detach()

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
        return logits_TE.new_zeros(())  # balanced by the bias, not by a loss

    def after_gating(self, route: Route, x_TD: torch.Tensor, token_ids_T=None) -> Route:
        s_TE = self.scores(route.scores_TE)
        kept_TK = route.kept_TK
        gates_TK = s_TE.gather(1, route.expert_ids_TK.long().clamp_min(0)) * kept_TK
        if self.settings.lossfree_normalize:
            gates_TK = gates_TK / gates_TK.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).eps)
        return route.replace(combine_weights_TK=gates_TK.to(route.combine_weights_TK.dtype))

    def probabilities(self, x_TD: torch.Tensor, token_ids_T=None) -> torch.Tensor:
        """softmax(x W^T) in fp32 on x's device: the router's distribution, without the bias."""
        return F.softmax(F.linear(x_TD.float(), self.linear.weight.detach().float().to(x_TD.device)), dim=-1)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """b_e += u * sign(mean load - load_e), from [E] routes per expert of one optimizer step
        summed over every micro-batch and rank (the same counts on every rank: the same bias)."""
        load_E = counts_E.to(device=self.selection_bias.device, dtype=torch.float64)
        step_E = torch.sign(load_E.mean() - load_E) * self.settings.lossfree_bias_rate
        self.selection_bias.add_(step_E.to(self.selection_bias.dtype))


def routing(moe_cfg) -> Routing:
    """MoEConfig's routing, without DeepSpeed's Gumbel sampling of the second expert."""
    return dataclasses.replace(Routing.of(moe_cfg), top2_2nd_expert_sampling=False)


def build(router_cfg: LossFreeRouterConfig, moe_cfg, d_model: int, context=None) -> LossFreeRouter:
    return LossFreeRouter(d_model, routing(moe_cfg), router_cfg)


def check(router_cfg: LossFreeRouterConfig, moe_cfg) -> None:
    if router_cfg.lossfree_normalize and moe_cfg.k == 1:
        raise ConfigError("lossfree.lossfree_normalize: with moe.k 1 each token's one weight is always 1 and the "
                          "router never learns; pass --lossfree.no-normalize or --moe.k 2 or more")


SPEC = RouterSpec(build=build, config=LossFreeRouterConfig, check=check)
