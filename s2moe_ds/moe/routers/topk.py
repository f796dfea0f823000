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

    def __init__(self, model_dim: int, num_experts: int, *args, balance_form: str = "deepspeed", **kwargs) -> None:
        super().__init__(model_dim, num_experts, *args, **kwargs)
        self.add_module(ds.GATE_LINEAR, nn.Linear(model_dim, num_experts, bias=False))
        self.balance_form = balance_form

    @property
    def linear(self) -> nn.Linear:
        return getattr(self, ds.GATE_LINEAR)

    @classmethod
    def from_deepspeed_gate(cls, gate, eval_k: int, eval_drop_tokens: Optional[bool] = None,
                            **settings) -> "TopKRouter":
        """A router with the weights and settings of DeepSpeed's gate (`settings` replace some);
        eval_drop_tokens None keeps DeepSpeed's behaviour (drop in eval as in training). Call
        before DeepSpeed sets the layer's process groups."""
        router = cls.with_gate_settings(gate, eval_k, eval_drop_tokens, **settings)
        router.to(dtype=ds.gate_weight(gate).dtype)
        router.load_state_dict(gate.state_dict())
        return router

    def route_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.noisy_gate_policy == "Jitter" and self.training:
            return F.linear(ds.jitter(x_TD.float()), self.linear.weight.float())
        return fused.fp32_linear(x_TD, self.linear.weight)

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> Optional[torch.Tensor]:
        if self.balance_form == "all_assignments":
            return assignment_balance(F.softmax(logits_TE, dim=-1), logits_TE, k)
        return None  # DeepSpeed's own, from its gating

    def probabilities(self, x_TD: torch.Tensor, token_ids_T=None) -> torch.Tensor:
        """softmax(x W^T) in fp32 on x's device, without the training noise."""
        return F.softmax(F.linear(x_TD.float(), self.linear.weight.detach().float().to(x_TD.device)), dim=-1)


def build(router_cfg: TopKRouterConfig, moe_cfg, deepspeed_gate, context=None) -> TopKRouter:
    # DeepSpeed's gate was built with the routing settings MoEConfig shares with every router.
    return TopKRouter.from_deepspeed_gate(deepspeed_gate, moe_cfg.resolved_eval_k, moe_cfg.eval_drop_tokens,
                                          noisy_gate_policy=router_cfg.noisy_gate_policy, use_rts=router_cfg.use_rts,
                                          top2_2nd_expert_sampling=router_cfg.top2_2nd_expert_sampling,
                                          balance_form=router_cfg.balance_loss)


SPEC = RouterSpec(build=build, config=TopKRouterConfig)
