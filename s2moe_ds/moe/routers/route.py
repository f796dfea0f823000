"""What a router's route() returns: a typed route, ours, from which the one adapter
(parallel/deepspeed_internals.py, "routes and DeepSpeed's dispatch") makes DeepSpeed's dispatch.

Shapes: T tokens, E experts, K routes per token (k of this call: the training or the eval k).
Each route (t, j) sends token t to expert expert_ids_TK[t, j], into slot positions_TK[t, j] of
that expert's buffer of `capacity` slots, and its expert output counts combine_weights_TK[t, j]
in the token's output. A route the capacity limit dropped has expert id -1 and weight 0.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Union

import torch


@dataclass(frozen=True)
class Route:
    scores_TE: torch.Tensor
    """fp32 routing logits the experts were chosen by (the router's training noise included, never
    DeepSpeed's Gumbel sampling of the second expert, which only DeepSpeed's gating sees)."""
    expert_ids_TK: torch.Tensor
    """int32 expert of every route, -1 where the capacity limit dropped it."""
    positions_TK: torch.Tensor
    """int32 slot of every route in its expert's buffer (0 where dropped)."""
    combine_weights_TK: torch.Tensor
    """fp32 weight of every route's expert output in its token's output (0 where dropped); in the
    graph, so the router learns through it."""
    capacity: Union[int, torch.Tensor]
    """Slots per expert (DeepSpeed's gating may leave it a 0-dim tensor: read it once, it syncs)."""
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    """'balance' (the load-balancing loss, fp32 scalar in the graph), 'z_loss' (ST-MoE's router
    z-loss, in training when MoEConfig.z_loss_coef > 0) and the router's own (RouterSpec.loss_terms
    names them, e.g. StableMoE's 'distill')."""
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached: 'expert_counts' ([E] routes per expert before capacity drops) and
    'dropped_fraction' (share of the T * K routes the capacity limit dropped)."""

    @property
    def probs_TE(self) -> torch.Tensor:
        """The routing distribution, softmax of the scores."""
        return torch.softmax(self.scores_TE, dim=-1)

    @property
    def kept_TK(self) -> torch.Tensor:
        """True for the routes the capacity limit kept."""
        return self.expert_ids_TK >= 0

    def replace(self, **changes) -> "Route":
        """The same route with some fields replaced (e.g. a router's own combine weights)."""
        return dataclasses.replace(self, **changes)
