"""'topk': DeepSpeed's top-k gate (a linear router, softmax, top-k), deterministic in eval mode and
given its own eval_k (routers/base.py)."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check_bool, check_choice
from ...parallel import deepspeed_internals as ds
from .. import fused
from ..routing import Routing
from ..spec import RouterSpec
from .base import Router, assignment_balance

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
BALANCE_LOSSES = ("deepspeed", "all_assignments")


@dataclass
class TopKRouterConfig:
    """The settings of DeepSpeed's top-k gate that are its own (the shared ones are MoEConfig's)."""

    noisy_gate_policy: Optional[str] = None
    """DeepSpeed's router noise in training: None, 'Jitter' or 'RSample' (never applied in eval)."""
    use_rts: bool = True
    """DeepSpeed's random token selection for top-1 in training (never applied in eval)."""
    top2_2nd_expert_sampling: bool = True
    """DeepSpeed's Gumbel sampling of the second expert in training (never applied in eval)."""
    balance_loss: str = "deepspeed"
    """'deepspeed' (E * sum_e mean prob * share of first choices: 1 at balance) or
    'all_assignments' (every top-k choice counts: 1/k at balance; the authors' sister code)."""

    def __post_init__(self) -> None:
        check_choice(self.noisy_gate_policy, "topk.noisy_gate_policy", NOISY_GATE_POLICIES)
        check_bool(self.use_rts, "topk.use_rts")
        check_bool(self.top2_2nd_expert_sampling, "topk.top2_2nd_expert_sampling")
        check_choice(self.balance_loss, "topk.balance_loss", BALANCE_LOSSES)


class TopKRouter(Router):
    """logits = x W^T; W is the `linear` layer's weight, under DeepSpeed's gate's name in
    checkpoints (ds.GATE_LINEAR)."""

    kind = "topk"

    def __init__(self, model_dim: int, routing: Routing, balance_form: str = "deepspeed") -> None:
        super().__init__(model_dim, routing)
        self.add_module(ds.GATE_LINEAR, nn.Linear(model_dim, routing.num_experts, bias=False))
        self.balance_form = balance_form

    @property
    def linear(self) -> nn.Linear:
        return getattr(self, ds.GATE_LINEAR)

    def start_from(self, deepspeed_gate: nn.Module) -> None:
        """DeepSpeed's gate's initial weight: the drop-in starts where DeepSpeed's MoE would."""
        self.load_state_dict(deepspeed_gate.state_dict())

    def route_logits(self, x_TD: torch.Tensor, token_ids_T=None, *, noisy: bool = False) -> torch.Tensor:
        if noisy and self.noisy_gate_policy == "Jitter":
            return F.linear(ds.jitter(x_TD.float()), self.linear.weight.float())
        return fused.fp32_linear(x_TD, self.linear.weight)

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> Optional[torch.Tensor]:
        if self.balance_form == "all_assignments":
            return assignment_balance(F.softmax(logits_TE, dim=-1), logits_TE, k)
        return None  # DeepSpeed's own, from its gating

    def probabilities(self, x_TD: torch.Tensor, token_ids_T=None) -> torch.Tensor:
        """softmax(x W^T) in fp32 on x's device, without the training noise."""
        return F.softmax(F.linear(x_TD.float(), self.linear.weight.detach().float().to(x_TD.device)), dim=-1)


def build(router_cfg: TopKRouterConfig, moe_cfg, d_model: int, context=None) -> TopKRouter:
    return TopKRouter(d_model, Routing.of(moe_cfg, router_cfg), balance_form=router_cfg.balance_loss)


SPEC = RouterSpec(build=build, config=TopKRouterConfig)
