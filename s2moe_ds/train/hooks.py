"""Trainer hooks: a subclass overrides what it needs; every method is called on every rank.

    on_step_start(trainer, step)                       before step `step` (1-based) runs
    on_step_end(trainer, step)                         after its optimizer step and logging
    after_evaluation(trainer, step, split, result)     result: evaluate's metrics (bpc or ppl, ...)
    before_checkpoint_commit(trainer, step, path)      every file but COMPLETE and latest is written;
                                                       what it raises leaves the checkpoint incomplete
    after_checkpoint(trainer, step, path)              the checkpoint is complete and latest
    on_stop_signal(trainer, step, reason)              a stop signal was agreed and checkpointed

Modules of the model that define set_training_step(step) (a router that schedules itself) are
called by the trainer before the hooks' on_step_start.
"""


class TrainerHook:

    def on_step_start(self, trainer, step: int) -> None:
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
