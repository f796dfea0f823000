"""Tasks: what the trainer trains on. A task supplies the data, the batches, the forward and its
loss, the evaluator and its own state for the checkpoint; the trainer supplies everything else
(engine, layout, schedule, hooks, checkpoints, signals).

`Task` is the contract: the methods the trainer calls, in the order it calls them. Two tasks
implement it: LanguageModelingTask here (ExperimentConfig.task 'lm') and ClassificationTask in
finetune.py ('classification'), which sits beside the fine-tuning code it is built from (the
pretrained checkpoint's reading and FinetuneConfig).
"""

import abc
import shlex
from dataclasses import asdict, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data import ContiguousBatchSampler, DataConfig, StreamBatchSampler
from ..data.cache import prepare_on_ranks
from ..eval import evaluate_lm
from ..models import LMOutput, ModelConfig, build_model
from ..moe import total_loss
from ..config import ConfigError
from .config import ExperimentConfig


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A batch tensor on the engine's device. To a GPU through pinned memory, without waiting:
    a copy from pageable memory would make the host wait for the GPU at every micro-batch."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class Task(abc.ABC):
    """What the trainer trains on. The trainer calls, on every rank:

    Trainer.setup, in this order:
        prepare()                                  the data (collective: rank 0 fills caches first)
        configure_model(model) -> ModelConfig      the model config the data needs (vocabulary size)
        identity(), checkpoint_meta()              what a resumed checkpoint must match
        build_model(model_cfg, parallel)           the torch module (seeded by the trainer)
        load_initial_weights(model, layout)        a fresh run only; a resume loads its own
        describe()                                 rank 0 prints it with the model
        start(rank, world_size, micro_batch, seed, grad_accum)    the sampler
        load_state_dict(state), load_rank_state_dict(state, device)    a resume only
        run_record()                               run_config.json and each checkpoint's record
    each optimizer step, gradient_accumulation_steps times:
        next_batch() -> batch                      this rank's micro-batch, on the host
        forward(engine, batch) -> LMOutput         the engine's forward on it
        loss(out, terms) -> (total, parts)         the scalar to back-propagate and its named parts
        tokens_per_micro_batch()                   for tokens/s
    evaluate(engine, split, max_batches) -> metrics    every eval_interval (collective)
    state_dict(), rank_state_dict(), tokenizer     each checkpoint
    next_commands(ckpt_dir)                        printed at the end of training

    Nothing the trainer calls per micro-batch may read a tensor's value on the host or start a
    collective: the trainer reads the step's losses once per optimizer step
    (tests/distributed/test_host_syncs.py counts). The shared parts (the loss, the sampler's state, no
    per-rank state, no initial weights, no next commands) are defined here once."""

    name: str = ""
    """The ExperimentConfig.task this task trains ('lm', 'classification')."""

    def __init__(self) -> None:
        self.sampler = None
        self.model_cfg: Optional[ModelConfig] = None
        self.rank, self.world_size, self.micro_batch = 0, 1, 0

    # ------------------------------------------------------------------------------ setup

    @abc.abstractmethod
    def prepare(self) -> None:
        """Read or build the data and the tokenizer. Collective: every rank calls it together."""

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """The tokenizer (after prepare); each checkpoint saves it."""

    def configure_model(self, model: ModelConfig) -> ModelConfig:
        """The model config to build: `model` as the data needs it (kept as self.model_cfg)."""
        self.model_cfg = model
        return model

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint of this task must match to be resumed: the tokenizer's identity."""
        return self.tokenizer.identity()

    def checkpoint_meta(self) -> Dict[str, Any]:
        """What else, besides the model config and tokenizer, a resume must match (meta.json)."""
        return {}

    def build_model(self, model_cfg: ModelConfig, parallel) -> torch.nn.Module:
        """The module to train; the trainer seeds torch before and wraps it in the engine after."""
        return build_model(model_cfg, parallel)

    def load_initial_weights(self, model: torch.nn.Module, layout) -> None:
        """Weights a fresh run starts from, after the initialisation (a pretrained model's, for
        fine-tuning); by default the initialisation itself. Not called on a resume."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line on the data, which rank 0 prints after the model's."""

    def start(self, rank: int, world_size: int, micro_batch: int, seed: int, grad_accum: int = 1) -> None:
        """Called once the engine knows the batch sizes: this rank's sampler of `micro_batch`
        examples per micro-batch, seeded by `seed`, in optimizer steps of `grad_accum` micro-batches."""
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.sampler = self.make_sampler(seed, grad_accum)

    @abc.abstractmethod
    def make_sampler(self, seed: int, grad_accum: int):
        """The training sampler (start calls it); its state_dict is the data position."""

    @abc.abstractmethod
    def run_record(self) -> Dict[str, Any]:
        """This task's part of run_config.json (and of each checkpoint's 'run' record): its data
        settings and identity."""

    # ------------------------------------------------------------------------------ each micro-batch

    @abc.abstractmethod
    def next_batch(self) -> Tuple[torch.Tensor, ...]:
        """This rank's next micro-batch, host tensors: (x_BT, y_BT) for language modelling,
        (x_BT, labels_B, mask_BT) for classification."""

    @abc.abstractmethod
    def forward(self, engine, batch) -> LMOutput:
        """The engine's forward on `batch` (moved to engine.device); its task_loss is the mean
        loss of the micro-batch, a 0-dim tensor."""

    def loss(self, out: LMOutput, terms) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total, parts): the 0-dim loss to back-propagate, the task's loss plus the blocks' named
        losses weighted by `terms` (MoEConfig.loss_terms()); parts: {'task': ..., each named loss
        reduced over layers}, 0-dim tensors, read on the host at logging steps only."""
        total, reduced = total_loss(out.task_loss, out.layer_losses, terms)
        return total, {"task": out.task_loss, **reduced}

    @abc.abstractmethod
    def tokens_per_micro_batch(self) -> int:
        """Tokens of this rank's last micro-batch (for tokens/s); a host number, no tensor read."""

    # ------------------------------------------------------------------------------ evaluation

    @abc.abstractmethod
    def evaluate(self, engine, split: str, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Metrics over `split` (at most `max_batches` per rank), the engine in eval mode.
        Collective: every rank calls it; every rank returns the same numbers."""

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The data position (the same on every rank), for the checkpoint's client state."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume the data position from a checkpoint's client state (after start)."""
        self.sampler.load_state_dict(state["sampler"])

    def rank_state_dict(self) -> Optional[Dict[str, Any]]:
        """This rank's own state for the checkpoint (host tensors), or None: no per-rank state."""
        return None

    def load_rank_state_dict(self, state: Optional[Dict[str, Any]], device) -> None:
        """Resume what rank_state_dict saved (called only when it returns something)."""

    def next_commands(self, ckpt_dir: str) -> List[str]:
        """What to run on the checkpoints next, printed at the end of training."""
        return []


class LanguageModelingTask(Task):
    """Next-token prediction on a corpus: contiguous windows in a seeded order, validation as BPC
    (character and byte corpora) or word perplexity over full splits.

    A backbone with memory (ModelConfig.has_memory) reads the training split as ordered streams,
    one per row (data/sampler.py StreamBatchSampler); its `state` is carried from one training
    forward to the next, dropped where the streams restart, and saved per rank in checkpoints."""

    name = "lm"

    def __init__(self, data: DataConfig, seq_len: int) -> None:
        super().__init__()
        self.data = data
        self.seq_len = seq_len
        self.corpus = None
        self.state = None

    def prepare(self) -> None:
        """Collective: one rank per cache folder (global rank 0 on a shared --cache-dir, each node's
        first on a node-local one) tokenizes and fills it; the others then only read it."""
        self.corpus = prepare_on_ranks(self.data)

    @property
    def tokenizer(self):
        return self.corpus.tokenizer

    def configure_model(self, model: ModelConfig) -> ModelConfig:
        """The vocabulary is the corpus tokenizer's."""
        return super().configure_model(replace(model, vocab_size=self.corpus.tokenizer.vocab_size))

    def next_commands(self, ckpt_dir: str) -> List[str]:
        # Evaluation opens no corpus path the checkpoint records outside its run: the command passes it.
        corpus = "".join(f" --{f.replace('_', '-')} {shlex.quote(str(getattr(self.data, f)))}"
                         for f in ("path", "train_file", "valid_file", "test_file") if getattr(self.data, f))
        return [f"Sample:       python launch/generate.py --checkpoint {ckpt_dir}",
                f"Evaluate:     python launch/evaluate.py --checkpoint {ckpt_dir} --analysis{corpus}"]

    def run_record(self) -> Dict[str, Any]:
        return {"data": asdict(self.data), "tokenizer": self.identity(), "corpus": self.corpus.identity}

    def describe(self) -> str:
        return (f"data {self.corpus.identity.get('dataset')}, {len(self.corpus.splits['train']):,} train tokens, "
                f"tokenizer {self.identity()['kind']}")

    def make_sampler(self, seed: int, grad_accum: int):
        train = self.corpus.splits["train"]
        if self.model_cfg.has_memory:  # each micro step reads the next segment of every stream
            return StreamBatchSampler(train, self.seq_len, self.micro_batch, self.rank, self.world_size, seed)
        return ContiguousBatchSampler(train, self.seq_len, self.micro_batch, self.rank, self.world_size, seed,
                                      grad_accum)

    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch()

    def forward(self, engine, batch) -> LMOutput:
        x, y = (to_device(t, engine.device) for t in batch)
        if self.model_cfg.has_memory and self.sampler.restarted:
            self.state = None  # a new epoch of the streams: the memory belongs to the old one
        out = engine(x, y, None, self.state)
        self.state = out.state
        return out

    def evaluate(self, engine, split: str, max_batches=None) -> Dict[str, float]:
        """Full pass over `split`, shared by every rank (a collective)."""
        c = self.corpus
        # Its own memory from None: the training memory (self.state) is left for the next step.
        return evaluate_lm(engine, self.model_cfg, c.splits[split], self.seq_len, self.micro_batch, self.rank,
                           self.world_size, engine.device, c.units[split], c.metric, max_batches)

    def rank_state_dict(self) -> Optional[Dict[str, Any]]:
        """This rank's own state for the checkpoint: the memory of its streams (None without memory)."""
        if not self.model_cfg.has_memory:
            return None
        return {"memory": None if self.state is None else [m.detach().cpu() for m in self.state]}

    def load_rank_state_dict(self, state: Optional[Dict[str, Any]], device) -> None:
        if state is not None and state.get("memory") is not None:
            self.state = tuple(m.to(device) for m in state["memory"])


def task_for(experiment: ExperimentConfig, task: Optional[Task] = None) -> Task:
    """The task a Trainer runs: `task` when given, which must train what experiment.task names;
    else language modelling on experiment.data."""
    if task is None:
        if experiment.task != LanguageModelingTask.name:
            raise ConfigError(f"task: the {experiment.task} task is built from its own settings (FinetuneConfig): "
                              "run it with s2moe_ds.train.finetune.finetune() or launch/finetune.py, or pass "
                              "the Trainer its task")
        return LanguageModelingTask(experiment.data, experiment.train.seq_len)
    if not isinstance(task, Task):
        raise TypeError(f"task: {type(task).__name__} is not a s2moe_ds.train.Task; subclass Task (or "
                        "LanguageModelingTask) so that it has every method the trainer calls")
    if task.name != experiment.task:
        raise ConfigError(f"task: the experiment's task is {experiment.task!r} but the task given trains "
                          f"{task.name!r}; set ExperimentConfig(task={task.name!r})")
    return task
