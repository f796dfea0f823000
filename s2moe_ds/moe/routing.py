"""The routing settings every router shares, checked in one place: MoEConfig's fields, and the same
arguments of the S2MoE drop-in layer; and Routing, those settings as a router is built from them."""

from dataclasses import dataclass
from typing import Optional

from ..config import check_bool, check_int, check_number, require

BALANCE_COEF = 0.01
"""The default weight of the router's load-balancing loss (MoEConfig.balance_coef, S2MoE's balance_coef)."""


def check_top_k(k, num_experts: int, name: str) -> None:
    """k experts per token: an integer in [1, num_experts]."""
    check_int(k, name, 1)
    require(k <= num_experts, name, f"must be <= num_experts ({num_experts}), got {k}")


def check_routing(prefix: str, num_experts, k, eval_k, capacity_factor, eval_capacity_factor, min_capacity,
                  drop_tokens, eval_drop_tokens, balance_coef) -> None:
    """Each shared routing setting, its error named `prefix` + the field."""
    p = prefix
    check_int(num_experts, p + "num_experts", 1)
    check_top_k(k, num_experts, p + "k")
    if eval_k is not None:
        check_top_k(eval_k, num_experts, p + "eval_k")
    check_number(capacity_factor, p + "capacity_factor", 0.0, strict=True)
    check_number(eval_capacity_factor, p + "eval_capacity_factor", 0.0, strict=True)
    check_int(min_capacity, p + "min_capacity", 0)
    check_bool(drop_tokens, p + "drop_tokens")
    check_bool(eval_drop_tokens, p + "eval_drop_tokens")
    check_number(balance_coef, p + "balance_coef", 0.0, strict=False)


RANDOMNESS = ("noisy_gate_policy", "use_rts", "top2_2nd_expert_sampling")
"""Routing's fields for DeepSpeed's gate randomness, which a router's config may set."""


@dataclass(frozen=True)
class Routing:
    """The settings a router is built from: MoEConfig's shared routing fields (Routing.of) or the
    S2MoE drop-in's arguments of the same names, and DeepSpeed's gate randomness, which the top-k
    router's config sets and the other routers keep at DeepSpeed MoE's defaults."""

    num_experts: int
    k: int
    eval_k: int
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    eval_drop_tokens: bool = False
    noisy_gate_policy: Optional[str] = None
    """DeepSpeed's router noise in training: None, 'Jitter' or 'RSample'."""
    use_rts: bool = True
    """DeepSpeed's random token selection for top-1 in training."""
    top2_2nd_expert_sampling: bool = True
    """DeepSpeed's Gumbel sampling of the second expert in training."""
    z_loss: bool = False
    """Report the router z-loss in training (MoEConfig.z_loss_coef > 0)."""

    @classmethod
    def of(cls, moe_cfg, router_cfg=None) -> "Routing":
        """A MoEConfig's routing; DeepSpeed's gate randomness from router_cfg where it has those fields."""
        randomness = {name: getattr(router_cfg, name) for name in RANDOMNESS if hasattr(router_cfg, name)}
        return cls(num_experts=moe_cfg.num_experts, k=moe_cfg.k, eval_k=moe_cfg.resolved_eval_k,
                   capacity_factor=moe_cfg.capacity_factor, eval_capacity_factor=moe_cfg.eval_capacity_factor,
                   min_capacity=moe_cfg.min_capacity, drop_tokens=moe_cfg.drop_tokens,
                   eval_drop_tokens=moe_cfg.eval_drop_tokens, z_loss=moe_cfg.z_loss_coef > 0, **randomness)
