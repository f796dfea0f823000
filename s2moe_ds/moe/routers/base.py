"""What every router shares: DeepSpeed's gating on the router's own scores, made deterministic in
eval mode and given eval_k. A router is a subclass that computes its logits (and may replace the
combine weights or the balance loss); it is the module DeepSpeed's MOELayer calls as its gate.

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

from contextlib import contextmanager
from typing import Dict, Optional

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from torch import nn

from ...parallel import deepspeed_internals as ds


def gshard_balance(probs_TE: torch.Tensor, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """DeepSpeed's (GShard's) balance loss, E * sum_e mean_t(p_te) * (share of first choices on e),
    on a router's own probabilities; for k > 2, DeepSpeed's top-k form (every choice, divided by k)."""
    E = probs_TE.shape[1]
    if k <= 2:
        mask_TE = F.one_hot(logits_TE.argmax(dim=1), E)
    else:
        mask_TE = torch.zeros_like(probs_TE).scatter_(1, logits_TE.topk(k, dim=1).indices, 1.0)
    return (probs_TE.mean(0) * mask_TE.float().mean(0)).sum() * E / (1 if k <= 2 else k)


def assignment_balance(probs_TE: torch.Tensor, logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The balance loss over every top-k assignment: E * sum_e f_e * P_e, with f_e the share of
    the T * k assignments that go to e and P_e its probability mass over T * k. At balance it is
    1 / k (DeepSpeed's is 1): the form of the authors' sister code, which routes without capacity."""
    T, E = probs_TE.shape
    assigned_TE = torch.zeros_like(probs_TE).scatter_(1, logits_TE.topk(k, dim=1).indices, 1.0)
    return E * (assigned_TE.sum(0) * probs_TE.sum(0)).sum() / (T * k) ** 2


class Router(nn.Module):

    kind = ""
    """The registry name."""

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, noisy_gate_policy: Optional[str] = None,
                 drop_tokens: bool = True, use_rts: bool = True, ep_group=None, top2_2nd_expert_sampling: bool = True,
                 *, eval_k: int, eval_drop_tokens: bool) -> None:
        super().__init__()
        self.model_dim, self.num_experts = model_dim, num_experts
        self.k, self.eval_k = k, eval_k
        self.capacity_factor, self.eval_capacity_factor, self.min_capacity = capacity_factor, eval_capacity_factor, min_capacity
        self.noisy_gate_policy, self.use_rts, self.top2_2nd_expert_sampling = noisy_gate_policy, use_rts, top2_2nd_expert_sampling
        self.drop_tokens, self.eval_drop_tokens = drop_tokens, eval_drop_tokens
        self.ep_group = ep_group
        self.last_dropped_fraction = torch.zeros(())
        self.last_losses: Dict[str, torch.Tensor] = {}
        """Named losses of the router's own (besides the balance loss) from the last call."""
        self._token_ids = None

    @classmethod
    def with_gate_settings(cls, gate, eval_k: int, eval_drop_tokens: Optional[bool] = None, **kwargs) -> "Router":
        """A router with the routing settings of the gate DeepSpeed's MoE constructor built (and
        on its device); eval_drop_tokens None keeps DeepSpeed's (drop in eval as in training)."""
        args = ds.gate_arguments(gate)
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in args}
        args.update(overrides)
        model_dim, num_experts = args.pop("model_dim"), args.pop("num_experts")
        router = cls(model_dim, num_experts, **args, **kwargs, eval_k=eval_k,
                     eval_drop_tokens=args["drop_tokens"] if eval_drop_tokens is None else eval_drop_tokens)
        return router.to(device=ds.gate_weight(gate).device)

    def _set_ep_group(self, ep_group) -> None:
        """Called by DeepSpeed's MOELayer when the engine creates the expert-parallel groups."""
        self.ep_group = ep_group

    # -------------------------------------------------------------------------- what a router defines

    def route_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 routing logits (with the router's training noise, if it has any)."""
        raise NotImplementedError

    def probabilities(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T, E] fp32 routing distribution on x's device, deterministic: what analysis reads
        (computed where the router's weights are)."""
        device = next(self.parameters()).device
        with self.tokens(None if token_ids_T is None else token_ids_T.to(device)):
            training = self.training
            self.train(False)
            try:
                return torch.softmax(self.route_logits(x_TD.to(device)), dim=-1).to(x_TD.device)
            finally:
                self.train(training)

    def balance_loss(self, logits_TE: torch.Tensor, k: int) -> Optional[torch.Tensor]:
        """The router's own balance loss from its logits (before DeepSpeed's gating, which may add
        noise to them in place); None keeps DeepSpeed's."""
        return None

    def after_gating(self, gate_output, x_TD: torch.Tensor):
        """The gating output, changed as the router's method says (e.g. its combine weights)."""
        return gate_output

    # -------------------------------------------------------------------------- shared

    @contextmanager
    def tokens(self, token_ids_T: Optional[torch.Tensor]):
        """The token ids of the next call (DeepSpeed's dispatch passes only the hidden states).
        Nests: analysis calls probabilities() inside a dispatch, which must keep its own ids."""
        outer, self._token_ids = self._token_ids, token_ids_T
        try:
            yield
        finally:
            self._token_ids = outer

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

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        training = self.training
        k = self.k if training else self.eval_k
        drop = self.drop_tokens if training else self.eval_drop_tokens
        factor = self.capacity_factor if training else self.eval_capacity_factor
        logits_TE = self.route_logits(input)
        if k == 1 and not drop:
            factor, drop = self._capacity_for_all(logits_TE), True
        self.last_losses = {}
        real_T = None if used_token is None else used_token.reshape(-1) > 0
        # Padding (used_token 0) stays out of the balance loss: DeepSpeed's top-2 and top-k gates
        # take no mask, and its top-1 averages the gate probabilities over the padding too.
        balance = self.balance_loss(logits_TE if real_T is None else logits_TE[real_T], k)
        if balance is None and real_T is not None and training:
            real_TE = logits_TE[real_T].float()
            balance = gshard_balance(F.softmax(real_TE, dim=1), real_TE, k) if len(real_TE) else real_TE.sum()
        if balance is not None:
            # DeepSpeed's top-2 adds its Gumbel noise to the logits in place; the loss read them.
            logits_TE = logits_TE.clone()
        # DeepSpeed's top-1 refuses fewer tokens than min_capacity (sampling feeds one at a time);
        # below it every expert's capacity holds all tokens either way, so nothing else changes.
        out = ds.gate_on_logits(logits_TE, k=k, capacity_factor=factor,
                                min_capacity=min(self.min_capacity, logits_TE.shape[0]),
                                used_token=used_token, noisy_gate_policy=self.noisy_gate_policy if training else None,
                                drop_tokens=drop, use_rts=self.use_rts and training, ep_group=self.ep_group,
                                second_expert_sampling=self.top2_2nd_expert_sampling and training,
                                sparse_routes=sparse_routes, use_tutel=use_tutel)
        if balance is not None:
            out = ds.with_balance_loss(out, balance)
        if sparse_routes:
            out = self.after_gating(out, input)
            self.last_dropped_fraction = ds.dropped_fraction(out)
        return out
