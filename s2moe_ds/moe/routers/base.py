"""What every router shares: DeepSpeed's gating on the router's own scores, made deterministic in
eval mode and given eval_k. A router is a subclass that computes its logits (and may replace the
combine weights, add losses of its own or replace the balance loss); route() gives its typed Route
(routers/route.py), in fp32, and leaves nothing behind. It is also the module DeepSpeed's MOELayer
calls as its gate: forward answers through the adapter in parallel/deepspeed_internals.py.

In eval mode the router routes with `eval_k` experts and all randomness off (DeepSpeed's top-2
second-expert sampling and top-1 random token selection would otherwise act in eval too), and drops
tokens beyond capacity only if `eval_drop_tokens` (with drops, a token's output depends on which
other tokens share its batch, so metrics would change with batch size and process count). One
repair of DeepSpeed 0.19: its top-1 gating without token drops passes a tensor capacity to
torch.topk and fails, so top-1 without drops runs as top-1 WITH drops at a capacity no expert can
exceed (the largest expert count in the expert-parallel group), which drops nothing and routes
identically.

Shapes: T tokens, D = model width, E experts, K routes per token.
"""

from typing import Optional

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from torch import nn

from ...parallel import deepspeed_internals as ds
from ..routing import Routing
from .route import Route


def gshard_balance(probs_TE: torch.Tensor, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """DeepSpeed's (GShard's) balance loss, E * sum_e mean_t(p_te) * (share of first choices on e),
    on a router's own probabilities; for k > 2, DeepSpeed's top-k form (every choice, divided by k)."""
    E = probs_TE.shape[1]
    if k <= 2:
        mask_TE = F.one_hot(logits_TE.argmax(dim=1), E)
    else:
        mask_TE = torch.zeros_like(probs_TE).scatter_(1, logits_TE.topk(k, dim=1).indices, 1.0)
    return (probs_TE.mean(0) * mask_TE.float().mean(0)).sum() * E / (1 if k <= 2 else k)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al., 2022), mean_t logsumexp_e(logits_te)^2 in fp32: it keeps
    the router's logits small, where the softmax's rounding errors stay small too."""
    if not len(logits_TE):
        return logits_TE.float().sum()  # no real token: 0, still in the graph
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def assignment_balance(probs_TE: torch.Tensor, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The balance loss over every top-k assignment: E * sum_e f_e * P_e, with f_e the share of
    the T * k assignments that go to e and P_e its probability mass over T * k. At balance it is
    1 / k (DeepSpeed's is 1): the form of the authors' sister code, which routes without capacity."""
    T, E = probs_TE.shape
    assigned_TE = torch.zeros_like(probs_TE).scatter_(1, logits_TE.topk(k, dim=1).indices, 1.0)
    return E * (assigned_TE.sum(0) * probs_TE.sum(0)).sum() / (T * k) ** 2


class Router(nn.Module):
    """Built from its config (Routing, plus the router's own settings); route() is its whole
    interface to a block. DeepSpeed's MOELayer calls it as its gate (forward), which answers with
    the route the block made (or makes one, for DeepSpeed's own forward) in DeepSpeed's form."""

    kind = ""
    """The registry name."""

    def __init__(self, model_dim: int, routing: Routing) -> None:
        super().__init__()
        self.model_dim, self.num_experts = model_dim, routing.num_experts
        # Attributes, not a frozen config: a schedule sets k (SMoE-Dropout) and evaluation eval_k.
        self.k, self.eval_k = routing.k, routing.eval_k
        self.capacity_factor, self.eval_capacity_factor = routing.capacity_factor, routing.eval_capacity_factor
        self.min_capacity = routing.min_capacity
        self.drop_tokens, self.eval_drop_tokens = routing.drop_tokens, routing.eval_drop_tokens
        self.noisy_gate_policy, self.use_rts = routing.noisy_gate_policy, routing.use_rts
        self.top2_2nd_expert_sampling = routing.top2_2nd_expert_sampling
        self.z_loss = routing.z_loss
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        """Called by DeepSpeed's MOELayer when the engine creates the expert-parallel groups."""
        self.ep_group = ep_group

    def start_from(self, deepspeed_gate: nn.Module) -> None:
        """Called once at build with the gate DeepSpeed's MoE constructor made and the router
        replaces: a router with that gate's weights takes them, so that a seed gives DeepSpeed's
        initial router. Most have other weights and ignore it."""

    # -------------------------------------------------------------------------- what a router defines

    def route_logits(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None, *,
                     noisy: bool = False) -> torch.Tensor:
        """[T, E] fp32 routing logits; noisy: with the router's training noise, if it has any."""
        raise NotImplementedError

    def probabilities(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T, E] fp32 routing distribution on x's device, deterministic: what analysis reads
        (computed where the router's weights are)."""
        device = next(self.parameters()).device
        ids_T = None if token_ids_T is None else token_ids_T.to(device)
        return torch.softmax(self.route_logits(x_TD.to(device), ids_T), dim=-1).to(x_TD.device)

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> Optional[torch.Tensor]:
        """The router's own balance loss from its logits (before DeepSpeed's gating, which may add
        noise to them in place); None keeps DeepSpeed's."""
        return None

    def selection_logits(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 values DeepSpeed's gating picks each token's top-k by (its capacity and slots
        too); the logits themselves unless the router selects by something else (the loss-free
        router: its scores plus a per-expert bias)."""
        return logits_TE

    def after_gating(self, route: Route, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor]) -> Route:
        """The route, changed as the router's method says (e.g. its combine weights, its own losses)."""
        return route

    # -------------------------------------------------------------------------- shared

    def _capacity_for_all(self, logits_TE: torch.Tensor) -> float:
        """A capacity factor whose capacity holds every token that any expert of the group receives."""
        T, E = logits_TE.shape
        if self.training and self.noisy_gate_policy == "RSample":
            # Routes follow noisy logits this argmax cannot see. On the logits' device: the
            # all-reduce below may be NCCL's, which refuses CPU tensors.
            need = torch.tensor([T], device=logits_TE.device)
        else:
            need = torch.bincount(logits_TE.argmax(dim=-1), minlength=E).max().reshape(1)
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(need, op=dist.ReduceOp.MAX, group=self.ep_group)
        return ds.capacity_factor_holding(int(need.item()), T, E)

    def route(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None,
              mask_T: Optional[torch.Tensor] = None) -> Route:
        """The route of the [T, D] tokens x (token_ids_T: their [T] ids, for routers that route by
        token; mask_T: [T], 0 for padding) in the router's mode: training (k, drops, its noise
        and DeepSpeed's randomness) or eval (eval_k, eval_drop_tokens, no randomness). Router
        math runs in fp32. Losses: 'balance', 'z_loss' in training if the router was built with it
        (Routing.z_loss: over the real tokens, as the balance loss), and the router's own. Leaves
        nothing behind in the router."""
        training = self.training
        k = self.k if training else self.eval_k
        drop = self.drop_tokens if training else self.eval_drop_tokens
        factor = self.capacity_factor if training else self.eval_capacity_factor
        logits_TE = self.route_logits(x_TD, token_ids_T, noisy=training)
        select_TE = self.selection_logits(logits_TE)
        if k == 1 and not drop:
            factor, drop = self._capacity_for_all(select_TE), True
        real_T = None if mask_T is None else mask_T.reshape(-1) > 0
        # Padding (mask 0) stays out of the balance loss: DeepSpeed's top-2 and top-k gates
        # take no mask, and its top-1 averages the gate probabilities over the padding too.
        balance = self.balance_loss(logits_TE if real_T is None else logits_TE[real_T], k)
        if balance is None and real_T is not None and training:
            real_TE = logits_TE[real_T].float()
            balance = gshard_balance(F.softmax(real_TE, dim=1), real_TE, k) if len(real_TE) else real_TE.sum()
        # Before the gating, which may change the logits in place. Only when configured, so that a
        # run without it computes and reports nothing more.
        z_loss = {}
        if self.z_loss and training:
            z_loss["z_loss"] = router_z_loss(logits_TE if real_T is None else logits_TE[real_T])
        sampling = self.top2_2nd_expert_sampling and training
        # DeepSpeed's top-2 adds its Gumbel noise to the logits in place: the gating gets a copy,
        # so that the balance loss and the route's scores keep the router's own.
        gated_TE = select_TE.clone() if balance is not None or (k == 2 and sampling) else select_TE
        # DeepSpeed's top-1 refuses fewer tokens than min_capacity (sampling feeds one at a time);
        # below it every expert's capacity holds all tokens either way, so nothing else changes.
        gating = ds.gate_on_logits(gated_TE, k=k, capacity_factor=factor,
                                   min_capacity=min(self.min_capacity, logits_TE.shape[0]),
                                   used_token=mask_T, noisy_gate_policy=self.noisy_gate_policy if training else None,
                                   drop_tokens=drop, use_rts=self.use_rts and training, ep_group=self.ep_group,
                                   second_expert_sampling=sampling)
        deepspeed_balance = gating.pop("balance")
        balance = deepspeed_balance if balance is None else balance
        counts_E = gating.pop("expert_counts")
        route = Route(scores_TE=logits_TE, **gating, losses={"balance": balance.float(), **z_loss},
                      metrics={"expert_counts": counts_E})
        route = self.after_gating(route, x_TD, token_ids_T)
        dropped = (route.expert_ids_TK < 0).float().mean().detach()
        return route.replace(metrics={**route.metrics, "dropped_fraction": dropped})

    def forward(self, input: torch.Tensor, used_token=None, sparse_routes: bool = False, use_tutel: bool = False):
        """DeepSpeed's gate interface, for DeepSpeed's MOELayer (parallel/deepspeed_internals.py's
        gate_call): the route as DeepSpeed's gating tuple."""
        return ds.gate_call(self.route, input, used_token, sparse_routes)
