"""'stablemoe': StableMoE's router (Dai et al. 2022, "StableMoE: Stable Routing Strategy for Mixture
of Experts").

Stage 1 (the first stablemoe_stage1_steps steps; by default a tenth of the run, our choice):
routing scores s = h C^T of the hidden states h against expert centroids C, DeepSpeed's top-k
gating on them, each route weighted by sigmoid(s) instead of a softmax share, and StableMoE's
balance loss: sum_e ((n_e - n/E) / (n/E)) * sum_{t routed to e} sigmoid(s_te), per token (n_e
routes to expert e of n = T*k). Meanwhile a lightweight distilled router
learns to predict the stage-1 choice from the token alone: token embeddings of
stablemoe_distill_dim dimensions against centroids of its own, trained by cross-entropy against
the first choice (the loss 'distill', weight stablemoe_distill_coef).

Stage 2: at the switch the distilled router's scores for every token id are copied into a frozen
table (a buffer, saved with the model), and from then on the routes are a fixed function of the
token id; the combine weights sigmoid(h C^T) still learn, and the balance loss is 0. The switch is a step in the config,
applied by the trainer before each step (set_training_step), so a resumed run switches at the same
step or finds the table already frozen in its checkpoint. The token ids reach the router from the
block (Router.route's token_ids_T); a noisy copy of S2MoE keeps its token's id, hence its token's experts.

With `stablemoe_sister`, the variant of the S2MoE authors' sister code: one stage, cosine scores of
the hidden states against L2-normalised centroids, softmax combine weights, the balance loss at a
temperature of 0.3; no distillation and no frozen routing.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError, check_bool, check_int, check_number, check_optional_int
from ..losses import LossTerm
from ..routing import Routing
from ..spec import RouterSpec
from .base import Router, gshard_balance
from .route import Route

SISTER_BALANCE_TEMPERATURE = 0.3


@dataclass
class StableMoERouterConfig:
    """StableMoE's two stages."""

    stablemoe_stage1_steps: Optional[int] = None
    """Steps of stage 1 (learned routing, distilled); from the next step on, routing is frozen.
    None: a tenth of the run's max_steps (our choice; docs/routers.md)."""
    stablemoe_distill_dim: int = 50
    """Dimension of the distilled router's token embeddings."""
    stablemoe_distill_coef: float = 1.0
    """Weight of the distillation loss in the total loss (it trains only the distilled router)."""
    stablemoe_sister: bool = False
    """The sister code's variant: one stage of cosine routing on hidden states, no distillation."""

    def __post_init__(self) -> None:
        p = "stablemoe."
        check_optional_int(self.stablemoe_stage1_steps, p + "stablemoe_stage1_steps", 0)
        check_int(self.stablemoe_distill_dim, p + "stablemoe_distill_dim", 1)
        check_number(self.stablemoe_distill_coef, p + "stablemoe_distill_coef", 0.0, strict=False)
        check_bool(self.stablemoe_sister, p + "stablemoe_sister")


class StableMoERouter(Router):

    kind = "stablemoe"

    def __init__(self, model_dim: int, routing: Routing, settings: StableMoERouterConfig, vocab_size: int) -> None:
        super().__init__(model_dim, routing)
        num_experts = routing.num_experts
        self.settings = settings
        # Named without "expert": DeepSpeed moves such state-dict keys into the per-expert files.
        self.centroids = nn.Linear(model_dim, num_experts, bias=False)
        if not settings.stablemoe_sister:
            self.token_embedding = nn.Embedding(vocab_size, settings.stablemoe_distill_dim)
            self.distilled_centroids = nn.Linear(settings.stablemoe_distill_dim, num_experts, bias=False)
            self.register_buffer("frozen_logits", torch.zeros(vocab_size, num_experts))
            self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    # -------------------------------------------------------------------------- the two stages

    def stage1_steps(self, max_steps: int) -> int:
        given = self.settings.stablemoe_stage1_steps
        return max_steps // 10 if given is None else given

    def set_training_step(self, step: int, max_steps: int) -> None:
        if not self.settings.stablemoe_sister and step > self.stage1_steps(max_steps) and not self.frozen:
            self.freeze()

    @torch.no_grad()
    def freeze(self) -> None:
        """Stage 2: the distilled router's scores of every token id, frozen from here on."""
        table_VE = self.distilled_centroids(self.token_embedding.weight).float()
        self.frozen_logits.copy_(table_VE.to(self.frozen_logits.dtype))
        self.frozen.fill_(True)

    @staticmethod
    def _ids(token_ids_T: Optional[torch.Tensor]) -> torch.Tensor:
        if token_ids_T is None:
            raise ConfigError("router 'stablemoe': needs the token ids of the tokens it routes; call the block's "
                              "forward_parts with token_ids (the models of s2moe_ds do)")
        return token_ids_T

    # -------------------------------------------------------------------------- the router

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 scores of the hidden states against the centroids (cosine in the sister variant)."""
        weight = self.centroids.weight.float()
        if self.settings.stablemoe_sister:
            weight = F.normalize(weight, dim=1)
        return F.linear(x_TD.float(), weight)

    def route_logits(self, x_TD: torch.Tensor, token_ids_T=None, *, noisy: bool = False) -> torch.Tensor:
        if self.settings.stablemoe_sister or not self.frozen:
            return self.scores(x_TD)
        return self.frozen_logits[self._ids(token_ids_T)].float()

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
        if self.settings.stablemoe_sister:
            return gshard_balance(F.softmax(logits_TE / SISTER_BALANCE_TEMPERATURE, dim=-1), logits_TE, k)
        if self.frozen:
            return logits_TE.new_zeros(())  # routing no longer learns: nothing to balance
        # StableMoE's own: each expert's assigned scores, pushed down in proportion to how far
        # its load is above the even share (and up when below). Per token, not summed over the
        # batch as in the paper, so that balance_coef does not depend on the batch size.
        T, E = logits_TE.shape
        assigned_TE = torch.zeros_like(logits_TE).scatter_(1, logits_TE.topk(k, dim=1).indices, 1.0)
        even = T * k / E
        excess_E = (assigned_TE.sum(0) - even) / even
        return (excess_E * (assigned_TE * torch.sigmoid(logits_TE)).sum(0)).sum() / T

    def after_gating(self, route: Route, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor]) -> Route:
        if self.settings.stablemoe_sister:
            return route
        scores_TE = self.scores(x_TD)
        idx_TK = route.expert_ids_TK.long()
        gates_TK = torch.sigmoid(scores_TE.gather(1, idx_TK.clamp_min(0))) * route.kept_TK
        losses = dict(route.losses)
        if self.training and not self.frozen and self.settings.stablemoe_distill_coef > 0:
            distilled_TE = self.distilled_centroids(self.token_embedding(self._ids(token_ids_T))).float()
            target_T = scores_TE.detach().argmax(dim=1)  # the stage-1 choice, a fixed target
            losses["distill"] = F.cross_entropy(distilled_TE, target_T)
        return route.replace(combine_weights_TK=gates_TK.to(route.combine_weights_TK.dtype), losses=losses)


def build(router_cfg: StableMoERouterConfig, moe_cfg, d_model: int, context) -> StableMoERouter:
    if context is None or context.vocab_size is None:
        raise ConfigError("router 'stablemoe': its distilled router routes by token id and needs the vocabulary "
                          "size; build it inside a model (s2moe_ds.models) or pass a ModelContext")
    return StableMoERouter(d_model, Routing.of(moe_cfg), router_cfg, context.vocab_size)


def loss_terms(router_cfg: StableMoERouterConfig, moe_cfg):
    if router_cfg.stablemoe_sister:
        return {}
    return {"distill": LossTerm(router_cfg.stablemoe_distill_coef, "sum")}


def flops(router_cfg: StableMoERouterConfig, moe_cfg, d_model: int, training: bool) -> int:
    """The centroid scores (routing in stage 1, the combine weights always), and in training the
    distilled router's (its embedding lookup is free)."""
    distill = 2 * router_cfg.stablemoe_distill_dim * moe_cfg.num_experts if training else 0
    return 2 * d_model * moe_cfg.num_experts + (0 if router_cfg.stablemoe_sister else distill)


SPEC = RouterSpec(build=build, config=StableMoERouterConfig, loss_terms=loss_terms, flops=flops)
