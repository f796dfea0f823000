"""Block kinds and routers by name. A new one is a file that defines its spec plus one line here.

A BlockSpec says how to build a feed-forward block from a MoEConfig, which settings of its own it
has, which named losses it reports and what it costs; a RouterSpec says how to build a router from
its config. Models, training, evaluation, FLOPs, analysis and comparisons ask these specs
(or the BlockOutput contract) and never switch on a kind themselves.
"""

from typing import Dict

from .blocks import dense, moe, s2moe
from .routers import lossfree, smoe_dropout, stablemoe, topk, xmoe
from .spec import BlockSpec, ModelContext, RouterSpec

BLOCKS: Dict[str, BlockSpec] = {
    "dense": dense.SPEC,
    "moe": moe.SPEC,
    "s2moe": s2moe.SPEC,
}

ROUTERS: Dict[str, RouterSpec] = {
    "topk": topk.SPEC,
    "xmoe": xmoe.SPEC,
    "stablemoe": stablemoe.SPEC,
    "smoe_dropout": smoe_dropout.SPEC,
    "lossfree": lossfree.SPEC,
}


def build_block(moe_cfg, kind: str, d_model: int, expert, ep_size: int = 1, context: ModelContext = ModelContext()):
    """A feed-forward block of `kind` ('dense' for the dense layers of a MoE model) with `expert`
    as its (per-expert) FFN, moe_cfg's router and its implementation of the experts."""
    block = BLOCKS[kind].build(moe_cfg, d_model, expert, ep_size, lambda: build_router(moe_cfg, d_model, context))
    if BLOCKS[kind].routed:
        block.use_expert_impl(moe_cfg.expert_impl)
    return block


def build_router(moe_cfg, d_model: int, context: ModelContext = ModelContext()):
    """The configured router for tokens of width d_model, from moe_cfg (its routing settings and
    router_config)."""
    return ROUTERS[moe_cfg.router].build(moe_cfg.router_config, moe_cfg, d_model, context)


def router_flops(moe_cfg, d_model: int, training: bool) -> int:
    return ROUTERS[moe_cfg.router].flops(moe_cfg.router_config, moe_cfg, d_model, training)
