"""Trainer hooks: a subclass overrides what it needs; every method is called on every rank.

    on_step_start(trainer, step)                       before step `step` (1-based) runs
    on_step_end(trainer, step)                         after its optimizer step and logging
    after_evaluation(trainer, step, split, result)     result: evaluate's metrics (bpc or ppl, ...)
    before_checkpoint_commit(trainer, step, path)      every file but COMPLETE and latest is written;
                                                       what it raises leaves the checkpoint incomplete
    after_checkpoint(trainer, step, path)              the checkpoint is complete and latest
    on_stop_signal(trainer, step, reason)              a stop signal was agreed and checkpointed

The trainer always runs TrainingStepSchedule first: it tells every module of the model that
defines set_training_step(step, max_steps) (a router that schedules itself: SMoE-Dropout's k,
StableMoE's stage switch) which step is about to run. A function of the step, so a resumed run
picks the schedule up exactly.
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


class TrainingStepSchedule(TrainerHook):
    """Calls set_training_step(step, max_steps) on the model's modules that define it."""

    def __init__(self, model, max_steps: int) -> None:
        self.modules = [m for m in model.modules() if hasattr(m, "set_training_step")]
        self.max_steps = max_steps

    def on_step_start(self, trainer, step: int) -> None:
        for module in self.modules:
            module.set_training_step(step, self.max_steps)
