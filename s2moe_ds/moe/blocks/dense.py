"""'dense': one feed-forward network on every token, no router and no auxiliary loss.

The block is the expert FFN itself (moe/experts.py), so a dense layer's state-dict keys are the
FFN's: the same for the dense layers of a MoE model (model.moe_every > 1) and for an all-dense one.
"""

from ..spec import BlockSpec


def build(moe_cfg, d_model: int, expert, ep_size: int, router):
    return expert


def flops(moe_cfg, d_model: int, d_inner: int, experts_per_token: int, training: bool, router_flops: int = 0):
    return {"dense_ffn": 4 * d_model * d_inner}


SPEC = BlockSpec(build=build, config=None, routed=False, loss_terms=lambda moe_cfg: {}, flops=flops)
