"""DeepSpeed's top-k gate, made deterministic in eval mode and given its own eval_k.

DeepSpeed's TopKGate applies the second-expert Gumbel sampling of top-2 in eval mode too, and
top-1's random token selection draws random numbers in eval whenever tokens exceed capacity.
Evaluation must be repeatable, and the paper evaluates with a different number of experts than it
trains with, so in eval mode this gate routes with `eval_k` experts and all randomness off, and
drops tokens beyond capacity only if `eval_drop_tokens` (with drops, a token's output depends on
which other tokens share its batch, so metrics would change with batch size and process count).
In training it is DeepSpeed's gate unchanged, except for one repair: DeepSpeed 0.19's top-1 gating
without token drops passes a tensor capacity to torch.topk and fails, so top-1 without drops runs
as top-1 WITH drops at a capacity no expert can exceed (the largest expert count in the
expert-parallel group), which drops nothing and routes identically.
"""

from typing import Optional

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate


class EvalDeterministicGate(TopKGate):

    def __init__(self, *args, eval_k: int, eval_drop_tokens: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eval_k = eval_k
        self.eval_drop_tokens = eval_drop_tokens
        self.last_dropped_fraction = torch.zeros(())

    def _top1_capacity_factor(self, input: torch.Tensor) -> float:
        """A capacity factor whose capacity holds every token that any expert of the group receives."""
        logits_TE = F.linear(input.float(), self.wg.weight.float())
        T, E = logits_TE.shape
        if self.training and self.noisy_gate_policy == "RSample":
            # Routes follow noisy logits this argmax cannot see. On the logits' device: the
            # all-reduce below may be NCCL's, which refuses CPU tensors.
            need = torch.tensor([T], device=logits_TE.device)
        else:
            need = torch.bincount(logits_TE.argmax(dim=-1), minlength=E).max().reshape(1)
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(need, op=dist.ReduceOp.MAX, group=self.ep_group)
        # DeepSpeed's capacity is ceil(T / E * factor), so this factor gives at least `need`.
        return max(int(need.item()), 1) * E / T

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        # TopKGate reads these attributes at call time; swapping them for one call keeps every
        # line of DeepSpeed's routing math in use instead of a copy of it.
        saved = (self.k, self.use_rts, self.top2_2nd_expert_sampling, self.drop_tokens, self.capacity_factor,
                 self.eval_capacity_factor)
        if not self.training:
            self.k, self.use_rts, self.top2_2nd_expert_sampling = self.eval_k, False, False
            self.drop_tokens = self.eval_drop_tokens
        if self.k == 1 and not self.drop_tokens:
            factor = self._top1_capacity_factor(input)
            self.capacity_factor = self.eval_capacity_factor = factor
            self.drop_tokens = True
        try:
            out = super().forward(input, used_token, sparse_routes, use_tutel)
        finally:
            (self.k, self.use_rts, self.top2_2nd_expert_sampling, self.drop_tokens, self.capacity_factor,
             self.eval_capacity_factor) = saved
        if sparse_routes:
            # out = (l_aux, capacity, E, indices_KS, locations_KS, gates_KS, exp_counts); routes
            # dropped by the capacity limit carry index -1.
            self.last_dropped_fraction = (out[3] < 0).float().mean().detach()
        return out


def install_eval_deterministic_gate(moe: MoE, eval_k: int, eval_drop_tokens: Optional[bool] = None
                                    ) -> EvalDeterministicGate:
    """Replace the gate of a DeepSpeed MoE layer by an EvalDeterministicGate with the same
    settings and weights; eval_drop_tokens None keeps DeepSpeed's (drop in eval as in training).
    Call before DeepSpeed sets the layer's process groups."""
    old: TopKGate = moe.deepspeed_moe.gate
    new = EvalDeterministicGate(old.wg.in_features,
                                old.wg.out_features,
                                k=old.k,
                                capacity_factor=old.capacity_factor,
                                eval_capacity_factor=old.eval_capacity_factor,
                                min_capacity=old.min_capacity,
                                noisy_gate_policy=old.noisy_gate_policy,
                                drop_tokens=old.drop_tokens,
                                use_rts=old.use_rts,
                                ep_group=old.ep_group,
                                top2_2nd_expert_sampling=old.top2_2nd_expert_sampling,
                                eval_k=eval_k,
                                eval_drop_tokens=old.drop_tokens if eval_drop_tokens is None else eval_drop_tokens)
    new.to(device=old.wg.weight.device, dtype=old.wg.weight.dtype)
    new.load_state_dict(old.state_dict())
    moe.deepspeed_moe.gate = new
    return new
