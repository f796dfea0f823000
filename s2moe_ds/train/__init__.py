"""The trainer (build, resume, steps, hooks, save, signals), its tasks, configs and presets, and
rank 0's monitor. A Task (tasks.py) is the contract between the trainer and what it trains on.
Imports eval (the task's evaluator), never the other way round."""

from .config import ExperimentConfig, TrainConfig
from .hooks import TrainerHook, TrainingStepSchedule
from .presets import PRESETS, apply_overrides, model_preset, preset
from .signals import EXIT_REQUEUE, REQUEUE_MARKER
from .tasks import LanguageModelingTask, Task
from .trainer import LossSpikeError, NonFiniteLossError, Trainer, UnhealthyLossError, pretrain

__all__ = ["EXIT_REQUEUE", "PRESETS", "REQUEUE_MARKER", "ExperimentConfig", "LanguageModelingTask",
           "LossSpikeError", "NonFiniteLossError", "Task", "TrainConfig", "Trainer", "UnhealthyLossError",
           "TrainerHook", "TrainingStepSchedule", "apply_overrides", "model_preset", "preset", "pretrain"]
