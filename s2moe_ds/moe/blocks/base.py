"""The contract of a feed-forward block, and what blocks that route over experts add to it.

Every block kind (dense, moe, s2moe) offers
    forward_parts(x_BTD, mask_BT, token_ids_BT=None) -> BlockOutput(output, losses, metrics)
with its named auxiliary losses (fp32 scalars, still in the graph) and detached metrics; the
token ids reach routers that route by token (StableMoE's distilled router). A routed block's
forward runs in phases: route (the router's Route, which carries the router's losses and metrics
out), then DeepSpeed's dispatch, experts and combine along it. The
blocks built on DeepSpeed's MoE (moe, s2moe) also keep its forward,
    forward(x, used_token) -> (output, l_aux, exp_counts)
for code that uses them as a drop-in for deepspeed.moe.layer.MoE; the dense block is the FFN.

Metric names: 'expert_counts' (routes per expert on this rank before capacity drops),
'dropped_fraction' (share of routes dropped by capacity), 'mix_gate' (S2MoE's g per token).
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from ...config import ConfigError
from ...parallel import ExpertLayout
from ...parallel import deepspeed_internals as ds


@dataclass
class BlockOutput:
    output: torch.Tensor
    """Same shape and dtype as the input."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Named auxiliary losses of this call; MoEConfig.loss_terms() says how they are weighted."""
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached values for logging."""


class Block:
    """Mixed into every block module."""

    kind = ""
    """The registry name of the block kind."""

    def forward_parts(self, hidden_states: torch.Tensor, used_token=None, token_ids=None) -> BlockOutput:
        raise NotImplementedError

    def reset_block_parameters(self) -> None:
        """Re-apply the initialisation the block owns, after the backbone's generic one."""


class ExpertBlock(Block):
    """Mixed into the blocks built on DeepSpeed's MoE layer (which they subclass)."""

    @property
    def router(self) -> nn.Module:
        """The router DeepSpeed's dispatch calls as its gate (moe/routers)."""
        return ds.gate(self)

    def local_experts(self) -> List[nn.Module]:
        return ds.local_experts(self)

    def use_expert_impl(self, impl: str) -> None:
        """At build time: 'loop' keeps DeepSpeed's experts module, 'batched' wraps the same experts
        in moe/experts.py's BatchedExperts."""
        from ..experts import BatchedExperts  # experts.py imports this module
        if impl == "batched" and not isinstance(ds.experts_module(self), BatchedExperts):
            ds.set_experts_module(self, BatchedExperts(ds.experts_module(self)))

    def register_dispatch_pre_hook(self, hook):
        """hook(module, args) before every dispatch; args[0] is the [T, D] router input."""
        return ds.dispatcher(self).register_forward_pre_hook(hook)

    def analysis_extras(self, x_ND: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-token values of the block's own, computed on router inputs, for the expert analysis."""
        return {}

    def install_router(self, router: nn.Module) -> None:
        """At build, after DeepSpeed's constructor: the router (built once, from its config) takes
        the place and state-dict keys of the gate that constructor made, and its initial weights
        where it has the same ones (Router.start_from)."""
        router.start_from(ds.set_gate(self, router))

    def route(self, x_TD: torch.Tensor, mask_T=None, token_ids_T=None):
        """Phase 1: the router's Route of the [T, D] tokens (moe/routers/route.py)."""
        return self.router.route(x_TD, token_ids_T, mask_T)

    def dispatch_and_combine(self, x: torch.Tensor, route, pair_weight_2T=None) -> torch.Tensor:
        """Phases 2-4, DeepSpeed's in one call: dispatch along the route (the all-to-all pair when
        expert-parallel), the experts, the combine by the route's weights; x's shape. pair_weight_2T:
        the [a; b] input's output is the weighted sum of each pair (a_t, b_t) (ds.can_pair says
        where DeepSpeed's dispatch allows it)."""
        return ds.dispatch(self, x, route, pair_weight_2T)


def expert_blocks(model: nn.Module) -> List[ExpertBlock]:
    """The model's blocks that route over experts, in order (DeepSpeed numbers its per-expert
    checkpoint files in this order too)."""
    return [m for m in model.modules() if isinstance(m, ExpertBlock)]


@contextmanager
def experts_per_token(model: nn.Module, eval_k: int):
    """Within the block, the model's routed blocks evaluate with `eval_k` experts per token."""
    routers = [block.router for block in expert_blocks(model)]
    saved = [r.eval_k for r in routers]
    for r in routers:
        if not 1 <= eval_k <= r.num_experts:
            raise ConfigError(f"eval_k: {eval_k} must be in [1, {r.num_experts}] (the layer's experts)")
        r.eval_k = eval_k
    try:
        yield
    finally:
        for r, k in zip(routers, saved):
            r.eval_k = k


def init_expert_weights(model: nn.Module, seed: int, layout: ExpertLayout) -> None:
    """Initialise each expert from its GLOBAL id, so the initial model is the same for any
    expert-parallel layout and no two experts start equal. Call before DeepSpeed takes its copies
    of the weights."""
    for layer_id, block in enumerate(expert_blocks(model)):
        for local_id, expert in enumerate(block.local_experts()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + layer_id * 10_007 + layout.global_id(local_id))
            for p in expert.parameters():
                with torch.no_grad():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                    else:
                        p.zero_()
