"""'smoe_dropout': SMoE-Dropout's router (Chen et al. 2023, "Sparse MoE as the New Dropout").

A linear router initialised at random and never trained, and a number of activated experts that
grows during training: k goes linearly from smoe_dropout_k_start (MoEConfig.k by default) to
smoe_dropout_k_end (every expert by default) over smoe_dropout_steps steps (the whole run by
default), set by the trainer before each step. The model can then be evaluated with any number of
experts ("self-slimmable": launch/evaluate.py --eval-k 1 2 4 ...). The balance loss is DeepSpeed's,
as in the S2MoE authors' sister code; its gradient reaches the tokens, never the frozen router.
The schedule is a function of the step, so a resumed run continues it exactly.
"""

from dataclasses import dataclass
from typing import Optional

from ...config import check_optional_int, require
from ..routing import Routing
from ..spec import RouterSpec
from .topk import TopKRouter


@dataclass
class SMoEDropoutRouterConfig:
    """SMoE-Dropout's schedule of activated experts."""

    smoe_dropout_k_start: Optional[int] = None
    """Experts per token at the first step; None: moe.k."""
    smoe_dropout_k_end: Optional[int] = None
    """Experts per token at the end of the schedule; None: every expert (moe.num_experts)."""
    smoe_dropout_steps: Optional[int] = None
    """Steps over which k grows linearly; None: the run's max_steps."""

    def __post_init__(self) -> None:
        p = "smoe_dropout."
        for name in ("smoe_dropout_k_start", "smoe_dropout_k_end", "smoe_dropout_steps"):
            check_optional_int(getattr(self, name), p + name, 1)


def scheduled_k(step: int, total: int, k_start: int, k_end: int) -> int:
    """k after `step` of `total` steps: linear from k_start to k_end, rounded down (k_end is
    reached at the last step), then held."""
    return k_start + (k_end - k_start) * min(step, total) // max(total, 1)


class SMoEDropoutRouter(TopKRouter):

    kind = "smoe_dropout"

    def __init__(self, model_dim: int, routing: Routing, settings: SMoEDropoutRouterConfig) -> None:
        super().__init__(model_dim, routing)
        self.linear.weight.requires_grad_(False)  # random and fixed: the optimizer never sees it
        self.k_start = settings.smoe_dropout_k_start or self.k
        self.k_end = settings.smoe_dropout_k_end or self.num_experts
        self.schedule_steps = settings.smoe_dropout_steps

    def set_training_step(self, step: int, max_steps: int) -> None:
        self.k = scheduled_k(step, self.schedule_steps or max_steps, self.k_start, self.k_end)


def build(router_cfg: SMoEDropoutRouterConfig, moe_cfg, d_model: int, context=None) -> SMoEDropoutRouter:
    return SMoEDropoutRouter(d_model, Routing.of(moe_cfg), router_cfg)


def check(router_cfg: SMoEDropoutRouterConfig, moe_cfg) -> None:
    start = router_cfg.smoe_dropout_k_start or moe_cfg.k
    end = router_cfg.smoe_dropout_k_end or moe_cfg.num_experts
    require(start <= end <= moe_cfg.num_experts, "smoe_dropout.smoe_dropout_k_end",
            f"must lie between the start k ({start}) and moe.num_experts ({moe_cfg.num_experts}), got {end}")


SPEC = RouterSpec(build=build, config=SMoEDropoutRouterConfig, check=check)
