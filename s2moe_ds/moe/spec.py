"""What a registry entry is (moe/registry.py): the interface of a block kind and of a router."""

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ModelContext:
    """What a block's router may need from the model around it."""

    vocab_size: Optional[int] = None
    """The tokenizer's vocabulary (a router that routes by token id sizes its tables by it)."""


@dataclass(frozen=True)
class BlockSpec:
    build: Callable
    """build(moe_cfg, d_model, expert, ep_size, router) -> the block module (see blocks/base.py);
    router() makes the configured router (once, from its config) for a block built on DeepSpeed's
    MoE, called after DeepSpeed's constructor."""
    config: Optional[type]
    """The dataclass of the kind's own settings (MoEConfig.block_config), or None."""
    routed: bool
    """Routes tokens over experts: has a router, num_experts and eval_k."""
    loss_terms: Callable
    """loss_terms(moe_cfg) -> {name: LossTerm} of the losses its blocks report."""
    flops: Callable
    """flops(moe_cfg, d_model, d_inner, experts_per_token, training, router_flops) -> {component:
    forward FLOPs per token of one layer}; router_flops is one router call's (RouterSpec.flops)."""
    check: Callable = lambda moe_cfg: None
    """Checks across MoEConfig and the kind's settings, raising ConfigError."""


def _linear_router_flops(router_cfg, moe_cfg, d_model: int, training: bool) -> int:
    return 2 * d_model * moe_cfg.num_experts


@dataclass(frozen=True)
class RouterSpec:
    build: Callable
    """build(router_cfg, moe_cfg, d_model, context: ModelContext) -> the router (routers/base.py),
    from its config alone."""
    config: Optional[type]
    """The dataclass of the router's own settings (MoEConfig.router_config), or None."""
    loss_terms: Callable = lambda router_cfg, moe_cfg: {}
    """loss_terms(router_cfg, moe_cfg) -> {name: LossTerm} of the losses of its own it reports
    (in its Route's losses), besides the balance loss."""
    flops: Callable = _linear_router_flops
    """flops(router_cfg, moe_cfg, d_model, training) -> forward FLOPs per token of one routing."""
    check: Callable = lambda router_cfg, moe_cfg: None
    """Checks across MoEConfig and the router's settings, raising ConfigError."""
