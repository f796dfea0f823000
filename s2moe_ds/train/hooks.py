"""Trainer hooks: a subclass overrides what it needs; every method is called on every rank.

    on_step_start(trainer, step)                       before step `step` (1-based) runs
    after_forward(trainer, step, out)                  after each micro-batch's forward (out: the
                                                       task's output, e.g. LMOutput)
    on_step_end(trainer, step)                         after its optimizer step and logging
    after_evaluation(trainer, step, split, result)     result: evaluate's metrics (bpc or ppl, ...)
    before_checkpoint_commit(trainer, step, path)      every file but COMPLETE and latest is written;
                                                       what it raises leaves the checkpoint incomplete
    after_checkpoint(trainer, step, path)              the checkpoint is complete and latest
    on_stop_signal(trainer, step, reason)              a stop signal was agreed and checkpointed

The trainer always runs TrainingStepSchedule first: it tells every module of the model that
defines set_training_step(step, max_steps) (a router that schedules itself: SMoE-Dropout's k,
StableMoE's stage switch) which step is about to run. A function of the step, so a resumed run
picks the schedule up exactly. With routers that balance by state (update_bias: the loss-free
router), it also runs LoadBalancingBias.
"""

from typing import List

import deepspeed.comm as dist
import torch

from ..moe import expert_blocks


class TrainerHook:

    def on_step_start(self, trainer, step: int) -> None:
        pass

    def after_forward(self, trainer, step: int, out) -> None:
        pass

    def on_step_end(self, trainer, step: int) -> None:
        pass

    def after_evaluation(self, trainer, step: int, split: str, result: dict) -> None:
        pass

    def before_checkpoint_commit(self, trainer, step: int, path: str) -> None:
        pass

    def after_checkpoint(self, trainer, step: int, path: str) -> None:
        pass

    def on_stop_signal(self, trainer, step: int, reason: str) -> None:
        pass


class TrainingStepSchedule(TrainerHook):
    """Calls set_training_step(step, max_steps) on the model's modules that define it."""

    def __init__(self, model, max_steps: int) -> None:
        self.modules = [m for m in model.modules() if hasattr(m, "set_training_step")]
        self.max_steps = max_steps

    def on_step_start(self, trainer, step: int) -> None:
        for module in self.modules:
            module.set_training_step(step, self.max_steps)


class LoadBalancingBias(TrainerHook):
    """For the routers that define update_bias(counts) (moe/routers/lossfree.py): sums each one's
    'expert_counts' over the step's micro-batches on the device, and after the optimizer step
    all-reduces them over every rank (one collective for all layers, no host read) and hands
    each router its layer's [E] total. The same totals on every rank give the same bias."""

    def __init__(self, routers: List) -> None:
        self.routers = routers
        self.counts_LE = None

    @classmethod
    def of(cls, model) -> List[TrainerHook]:
        """[the hook] when the model has such routers, else []: other runs meet no more often."""
        routers = [block.router for block in expert_blocks(model)]
        return [cls(routers)] if any(hasattr(r, "update_bias") for r in routers) else []

    def after_forward(self, trainer, step: int, out) -> None:
        counts = [out.layer_metrics.get(f"layer{i}/expert_counts") for i in range(len(self.routers))]
        if any(c is None for c in counts):
            raise RuntimeError(f"LoadBalancingBias: the forward reported expert counts for "
                               f"{sum(c is not None for c in counts)} of the model's {len(self.routers)} MoE "
                               "layers; the loss-free router's bias needs every layer's")
        counts_LE = torch.stack([c.to(torch.int64) for c in counts])
        self.counts_LE = counts_LE if self.counts_LE is None else self.counts_LE + counts_LE

    def on_step_end(self, trainer, step: int) -> None:
        counts_LE, self.counts_LE = self.counts_LE, None
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts_LE)
        for router, counts_E in zip(self.routers, counts_LE):
            if hasattr(router, "update_bias"):
                router.update_bias(counts_E)
