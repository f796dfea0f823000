"""Feed-forward blocks and routers, the S2MoE method, and their DeepSpeed wiring.

    config.py     MoEConfig: block kind, router, routing and loss settings
    registry.py   block kinds and routers by name (a new one: a file + a line)
    blocks/       dense, moe (DeepSpeed's MoE), s2moe; the BlockOutput contract (blocks/base.py)
    routers/      topk, xmoe, stablemoe, smoe_dropout (routers/base.py: what they share;
                  routers/route.py: the Route a router returns)
    routing.py    the routing settings every router shares (Routing) and their checks
    method/       S2MoE's plain formulas (docs/method.md)
    fused/        the same formulas as autograd Functions
    losses.py     named losses and the total loss
    experts.py    the expert FFN

Imports torch, DeepSpeed's internals only through s2moe_ds.parallel (and deepspeed.comm, its
public collectives, directly).
"""

from .blocks.base import BlockOutput, ExpertBlock, expert_blocks, experts_per_token, init_expert_weights
from .blocks.moe import MoEBlock
from .blocks.s2moe import S2MoE, S2MoEConfig
from .config import MoEConfig
from .experts import FFN
from .losses import LossTerm, total_loss
from .registry import BLOCKS, ROUTERS, build_block, build_router
from . import fused, method
from .routers.route import Route
from .routers.topk import TopKRouter, TopKRouterConfig
from .routing import Routing

__all__ = ["BLOCKS", "ROUTERS", "BlockOutput", "ExpertBlock", "FFN", "LossTerm", "MoEBlock", "MoEConfig", "Route",
           "Routing", "S2MoE", "S2MoEConfig", "TopKRouter", "TopKRouterConfig", "build_block", "build_router", "expert_blocks", "experts_per_token",
           "fused", "init_expert_weights", "method", "total_loss"]
