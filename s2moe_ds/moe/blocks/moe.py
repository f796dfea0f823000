"""'moe': DeepSpeed's own expert-parallel MoE layer with the configured router; the SMoE baseline.

Training is DeepSpeed's, unchanged; the router (moe/routers) makes evaluation deterministic and
gives it eval_k. The block subclasses deepspeed.moe.layer.MoE, so its forward is DeepSpeed's and
the engine treats it as any MoE layer (expert groups, expert parameter groups, per-expert files);
forward_parts routes first and hands the Route to DeepSpeed's dispatch.
"""

from ...parallel import check_expert_parallel
from ...parallel import deepspeed_internals as ds
from ..losses import LossTerm
from ..spec import BlockSpec
from .base import BlockOutput, ExpertBlock


class MoEBlock(ExpertBlock, ds.MoE):

    kind = "moe"

    def forward_parts(self, hidden_states, used_token=None, token_ids=None) -> BlockOutput:
        # DeepSpeed's top-1 gating reads used_token as one flag per token of the flattened batch.
        mask_T = None if used_token is None else used_token.reshape(-1)
        ids_T = None if token_ids is None else token_ids.reshape(-1)
        route = self.route(hidden_states.reshape(-1, hidden_states.shape[-1]), mask_T, ids_T)
        out = self.dispatch_and_combine(hidden_states, route)
        return BlockOutput(out, dict(route.losses), dict(route.metrics))


def deepspeed_moe_args(moe_cfg) -> dict:
    """The routing settings every router shares, as DeepSpeed's MoE constructor takes them."""
    return dict(num_experts=moe_cfg.num_experts, k=moe_cfg.k, capacity_factor=moe_cfg.capacity_factor,
                eval_capacity_factor=moe_cfg.eval_capacity_factor, min_capacity=moe_cfg.min_capacity,
                drop_tokens=moe_cfg.drop_tokens)


def build(moe_cfg, d_model: int, expert, ep_size: int, router) -> MoEBlock:
    check_expert_parallel(moe_cfg.num_experts, ep_size)  # DeepSpeed's own assert names no field
    block = MoEBlock(d_model, expert, ep_size=ep_size, **deepspeed_moe_args(moe_cfg))
    block.install_router(router())
    return block


def balance_term(moe_cfg) -> dict:
    return {"balance": LossTerm(moe_cfg.balance_coef, moe_cfg.balance_over_layers)}


def flops(moe_cfg, d_model: int, d_inner: int, experts_per_token: int, training: bool, router_flops: int):
    """The router and the active experts; the dispatch itself moves data, no FLOPs."""
    return {"router": router_flops, "experts": experts_per_token * 4 * d_model * d_inner}


SPEC = BlockSpec(build=build, config=None, routed=True, loss_terms=balance_term, flops=flops)
