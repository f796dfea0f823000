"""'topk': DeepSpeed's top-k gate, deterministic in eval mode and given its own eval_k.

DeepSpeed's TopKGate applies the second-expert Gumbel sampling of top-2 in eval mode too, and
top-1's random token selection draws random numbers in eval whenever tokens exceed capacity.
Evaluation must be repeatable, and the paper evaluates with a different number of experts than it
trains with, so in eval mode this router routes with `eval_k` experts and all randomness off, and
drops tokens beyond capacity only if `eval_drop_tokens` (with drops, a token's output depends on
which other tokens share its batch, so metrics would change with batch size and process count).
In training it is DeepSpeed's gate unchanged, except for one repair: DeepSpeed 0.19's top-1 gating
without token drops passes a tensor capacity to torch.topk and fails, so top-1 without drops runs
as top-1 WITH drops at a capacity no expert can exceed (the largest expert count in the
expert-parallel group), which drops nothing and routes identically.
"""

from dataclasses import dataclass
from typing import Optional

import deepspeed.comm as dist
import torch
import torch.nn.functional as F

from ...config import check_bool, check_choice
from ...parallel import deepspeed_internals as ds
from ..spec import RouterSpec

NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")


@dataclass
class TopKRouterConfig:
    """The settings of DeepSpeed's top-k gate that are its own (the shared ones are MoEConfig's)."""

    noisy_gate_policy: Optional[str] = None
    """DeepSpeed's router noise in training: None, 'Jitter' or 'RSample' (never applied in eval)."""
    use_rts: bool = True
    """DeepSpeed's random token selection for top-1 in training (never applied in eval)."""
    top2_2nd_expert_sampling: bool = True
    """DeepSpeed's Gumbel sampling of the second expert in training (never applied in eval)."""

    def __post_init__(self) -> None:
        check_choice(self.noisy_gate_policy, "topk.noisy_gate_policy", NOISY_GATE_POLICIES)
        check_bool(self.use_rts, "topk.use_rts")
        check_bool(self.top2_2nd_expert_sampling, "topk.top2_2nd_expert_sampling")


class TopKRouter(ds.TopKGate):

    kind = "topk"

    def __init__(self, *args, eval_k: int, eval_drop_tokens: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eval_k = eval_k
        self.eval_drop_tokens = eval_drop_tokens
        self.last_dropped_fraction = torch.zeros(())

    @classmethod
    def from_deepspeed_gate(cls, gate, eval_k: int, eval_drop_tokens: Optional[bool] = None,
                            **settings) -> "TopKRouter":
        """A router with the weights and settings of DeepSpeed's gate (`settings` replace some);
        eval_drop_tokens None keeps DeepSpeed's behaviour (drop in eval as in training). Call
        before DeepSpeed sets the layer's process groups."""
        args = {**ds.gate_arguments(gate), **settings}
        model_dim, num_experts = args.pop("model_dim"), args.pop("num_experts")
        router = cls(model_dim, num_experts, **args, eval_k=eval_k,
                     eval_drop_tokens=args["drop_tokens"] if eval_drop_tokens is None else eval_drop_tokens)
        weight = ds.gate_weight(gate)
        router.to(device=weight.device, dtype=weight.dtype)
        router.load_state_dict(gate.state_dict())
        return router

    def probabilities(self, x_TD: torch.Tensor) -> torch.Tensor:
        """softmax(x @ W^T) in fp32 on x's device: what the gate ranks experts by, without its noise."""
        weight = ds.gate_weight(self).detach().float().to(x_TD.device)
        return F.softmax(F.linear(x_TD.float(), weight), dim=-1)

    def _top1_capacity_factor(self, input: torch.Tensor) -> float:
        """A capacity factor whose capacity holds every token that any expert of the group receives."""
        logits_TE = F.linear(input.float(), ds.gate_weight(self).float())
        T, E = logits_TE.shape
        if self.training and self.noisy_gate_policy == "RSample":
            # Routes follow noisy logits this argmax cannot see. On the logits' device: the
            # all-reduce below may be NCCL's, which refuses CPU tensors.
            need = torch.tensor([T], device=logits_TE.device)
        else:
            need = torch.bincount(logits_TE.argmax(dim=-1), minlength=E).max().reshape(1)
        group = ds.gate_ep_group(self)
        if group is not None and dist.is_initialized() and dist.get_world_size(group=group) > 1:
            dist.all_reduce(need, op=dist.ReduceOp.MAX, group=group)
        return ds.capacity_factor_holding(int(need.item()), T, E)

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        settings = {}
        if not self.training:
            settings = dict(k=self.eval_k, use_rts=False, top2_2nd_expert_sampling=False,
                            drop_tokens=self.eval_drop_tokens)
        if settings.get("k", self.k) == 1 and not settings.get("drop_tokens", self.drop_tokens):
            factor = self._top1_capacity_factor(input)
            settings.update(capacity_factor=factor, eval_capacity_factor=factor, drop_tokens=True)
        with ds.gate_settings(self, **settings):
            out = super().forward(input, used_token, sparse_routes, use_tutel)
        if sparse_routes:
            self.last_dropped_fraction = ds.dropped_fraction(out)
        return out


def build(router_cfg: TopKRouterConfig, moe_cfg, deepspeed_gate) -> TopKRouter:
    # DeepSpeed's gate was built with the routing settings MoEConfig shares with every router.
    return TopKRouter.from_deepspeed_gate(deepspeed_gate, moe_cfg.resolved_eval_k, moe_cfg.eval_drop_tokens,
                                          noisy_gate_policy=router_cfg.noisy_gate_policy, use_rts=router_cfg.use_rts,
                                          top2_2nd_expert_sampling=router_cfg.top2_2nd_expert_sampling)


SPEC = RouterSpec(build=build, config=TopKRouterConfig)
