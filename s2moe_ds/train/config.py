"""The training loop's own settings, and the experiment config that joins every part of a run."""

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from ..config import ConfigError, check_bool, check_choice, check_int, check_number, check_optional_int, require
from ..data import DataConfig
from ..models import ModelConfig, check_backbone, model_config_from_dict
from ..parallel import ParallelConfig, check_expert_parallel
from ..progress import MODES as PROGRESS_MODES


@dataclass
class TrainConfig:
    """The training loop. Batch sizes, precision, ZeRO, clipping and the optimizer live in the
    DeepSpeed config; this holds what DeepSpeed does not know."""

    out_dir: str = "runs/tiny"
    """Run folder: checkpoints/, tensorboard/, run_config.json."""
    max_steps: int = 200
    """Optimizer steps (each of gradient_accumulation_steps micro-batches)."""
    seq_len: int = 64
    """Tokens per training sequence; at most model.max_seq_len."""
    lr: Optional[float] = None
    """Peak learning rate; None keeps the DeepSpeed config's optimizer.params.lr."""
    warmup_steps: int = 20
    """Linear warmup steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at max_steps."""
    eval_interval: int = 50
    """Evaluate on the validation split every n steps (and at the end); 0 disables."""
    eval_max_batches: Optional[int] = None
    """Cap on validation batches per rank; None evaluates the full split."""
    save_interval: int = 100
    """Checkpoint every n steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete. The newest
    one known to be healthy (a later step's loss was) is kept too, so 1 keeps two until then."""
    log_interval: int = 10
    """TensorBoard scalars every n steps (and, in a log file, a progress line)."""
    progress: str = "auto"
    """'bar' (a progress bar), 'lines' (a line per log_interval, for log files) or 'auto': a bar
    when stderr is a terminal, lines otherwise (a batch job's log)."""
    seed: int = 1234
    """Seed of weights, data order and noise."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir/checkpoints that verifies (none yet: start)."""
    resume_step: Optional[int] = None
    """Continue from this step's checkpoint instead (implies resume); newer checkpoints are set
    aside as checkpoints/superseded_step<N>, not deleted."""
    spike_factor: float = 10.0
    """A loss above spike_factor times the median of the last spike_window step losses (or times
    1 nat, where the median is smaller: a nearly solved task's hard batch is no spike) stops the run
    as a non-finite one does: the checkpoint whose weights gave it is set aside and the last
    healthy one named. 0: only non-finite losses stop it."""
    spike_window: int = 20
    """Step losses (this invocation's, each rank its own) the spike check takes the median of."""
    expect_world_size: Optional[int] = None
    """Refuse to start unless exactly this many processes joined (cluster scripts pass the task count)."""
    hang_timeout_s: float = 540.0
    """A rank that makes no progress for this long (one phase of a step, an evaluation, a
    checkpoint) stops the job, naming the ranks that were not heard from; every collective times
    out 5% + 5 s later (570 s by default). Raise it for checkpoints or evaluations that take longer."""
    save_on_signal: bool = True
    """On SIGUSR1 (SLURM's pre-timeout signal) or SIGTERM (preemption), finish the step, checkpoint
    and exit with status 75 (EXIT_REQUEUE) so that the job script requeues the run."""
    stop_after: Optional[int] = None
    """End this invocation (with a checkpoint) at this step, as a scheduler time slice would; the
    learning-rate schedule still spans max_steps, and --resume continues exactly."""

    def __post_init__(self) -> None:
        p = "train."
        require(isinstance(self.out_dir, str) and self.out_dir != "", p + "out_dir", "must be a folder path")
        require(not os.path.isfile(self.out_dir), p + "out_dir",
                f"{self.out_dir} is a file; name a folder (it is created if missing)")
        check_int(self.max_steps, p + "max_steps", 1)
        check_int(self.seq_len, p + "seq_len", 1)
        if self.lr is not None:
            check_number(self.lr, p + "lr", 0.0, strict=True)
        check_int(self.warmup_steps, p + "warmup_steps", 0)
        check_number(self.min_lr_ratio, p + "min_lr_ratio", 0.0, strict=False)
        require(self.min_lr_ratio <= 1, p + "min_lr_ratio", f"must be <= 1, got {self.min_lr_ratio}")
        check_int(self.eval_interval, p + "eval_interval", 0)
        check_optional_int(self.eval_max_batches, p + "eval_max_batches", 1)
        check_int(self.save_interval, p + "save_interval", 0)
        check_int(self.keep_checkpoints, p + "keep_checkpoints", 1)
        check_int(self.log_interval, p + "log_interval", 1)
        check_choice(self.progress, p + "progress", PROGRESS_MODES)
        check_int(self.seed, p + "seed", 0)
        check_bool(self.resume, p + "resume")
        check_optional_int(self.resume_step, p + "resume_step", 1)
        if self.resume_step is not None:
            self.resume = True
        check_number(self.spike_factor, p + "spike_factor", 0.0, strict=False)
        require(self.spike_factor == 0 or self.spike_factor > 1, p + "spike_factor",
                f"must be 0 (off) or above 1, got {self.spike_factor}")
        check_int(self.spike_window, p + "spike_window", 1)
        check_optional_int(self.expect_world_size, p + "expect_world_size", 1)
        check_number(self.hang_timeout_s, p + "hang_timeout_s", 0.0, strict=True)
        check_bool(self.save_on_signal, p + "save_on_signal")
        check_optional_int(self.stop_after, p + "stop_after", 1)

    def to_dict(self) -> dict:
        return asdict(self)


TASKS = ("lm", "classification")
"""What ExperimentConfig.task names: language modelling on a corpus (launch/pretrain.py), or
classification of labelled texts by a pretrained model (launch/finetune.py)."""


@dataclass
class ExperimentConfig:
    """Everything a run is: the model's architecture, its parallel layout, the task and its data,
    and the loop. The checks that need two of them are here, before anything is built."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The layout across processes."""
    data: Optional[DataConfig] = None
    """The corpus and its tokenization: the language-modelling task's data (None: the defaults).
    Classification takes none: its labelled texts are FinetuneConfig.data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop."""
    task: str = "lm"
    """What the run trains on: 'lm' (next-token prediction on `data`) or 'classification' (a
    pretrained model's fine-tuning, launch/finetune.py). Run records written before this field
    (no 'task') are language modelling."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_config_from_dict(self.model)
        for name, cls in (("parallel", ParallelConfig), ("data", DataConfig), ("train", TrainConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        self._check_task()
        check_backbone(self.model.backbone)
        if self.model.moe.routed:
            check_expert_parallel(self.model.moe.num_experts, self.parallel.ep_size)
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len: {self.train.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}; "
                              "lower --seq-len or raise --max-seq-len")

    def _check_task(self) -> None:
        require(self.task in TASKS, "task", f"must be 'lm' (language modelling, launch/pretrain.py) or "
                                            f"'classification' (fine-tuning, launch/finetune.py), got {self.task!r}")
        if self.task == "lm" and self.data is None:
            self.data = DataConfig()
        elif self.task != "lm" and self.data is not None:
            raise ConfigError(f"data: the {self.task} task reads no corpus (its labelled texts are "
                              "FinetuneConfig.data, set by launch/finetune.py's data flags); leave "
                              "ExperimentConfig.data unset")

    def check_world(self, world_size: int) -> None:
        """Checks that need the world size; they raise before any compute."""
        ep = self.parallel.ep_size
        if self.model.moe.routed and world_size % ep:
            raise ConfigError(f"parallel.ep_size: {ep} must divide the world size {world_size} "
                              "(expert-parallel groups tile the ranks); pick a divisor of the process count")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
