"""What a registry entry is (moe/registry.py): the interface of a block kind and of a router."""

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class BlockSpec:
    build: Callable
    """build(moe_cfg, d_model, expert, ep_size, router) -> the block module (see blocks/base.py);
    router(deepspeed_gate) makes the configured router for a block built on DeepSpeed's MoE."""
    config: Optional[type]
    """The dataclass of the kind's own settings (MoEConfig.block_config), or None."""
    routed: bool
    """Routes tokens over experts: has a router, num_experts and eval_k."""
    loss_terms: Callable
    """loss_terms(moe_cfg) -> {name: LossTerm} of the losses its blocks report."""
    flops: Callable
    """flops(moe_cfg, d_model, d_inner, experts_per_token, training) -> {component: forward FLOPs
    per token of one layer}."""
    check: Callable = lambda moe_cfg: None
    """Checks across MoEConfig and the kind's settings, raising ConfigError."""


@dataclass(frozen=True)
class RouterSpec:
    build: Callable
    """build(router_cfg, moe_cfg, deepspeed_gate) -> the router DeepSpeed's dispatch calls as its gate."""
    config: Optional[type]
    """The dataclass of the router's own settings (MoEConfig.router_config), or None."""
