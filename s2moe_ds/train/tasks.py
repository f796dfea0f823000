"""Tasks: what the trainer trains on. A task supplies the data, the batches, the forward and its
loss, the evaluator and its own state for the checkpoint; the trainer supplies everything else
(engine, layout, schedule, hooks, checkpoints, signals). Language modelling is the one task now.
"""

import shlex
from dataclasses import asdict, replace
from typing import Any, Dict, Optional, Tuple

import torch

from ..data import ContiguousBatchSampler, DataConfig, StreamBatchSampler, prepare_corpus
from ..eval import evaluate_lm
from ..models import LMOutput, ModelConfig, build_model
from ..moe import total_loss
from .collectives import rank_zero_first


class LanguageModelingTask:
    """Next-token prediction on a corpus: contiguous windows in a seeded order, validation as BPC
    (character and byte corpora) or word perplexity over full splits.

    A backbone with memory (ModelConfig.has_memory) reads the training split as ordered streams,
    one per row (data/sampler.py StreamBatchSampler); its `state` is carried from one training
    forward to the next, dropped where the streams restart, and saved per rank in checkpoints."""

    def __init__(self, data: DataConfig, seq_len: int) -> None:
        self.data = data
        self.seq_len = seq_len
        self.corpus = None
        self.sampler = None
        self.state = None
        self.model_cfg = None

    def prepare(self) -> None:
        """Collective: rank 0 tokenizes and fills the cache; the others then only read it."""
        self.corpus = rank_zero_first(lambda: prepare_corpus(self.data))

    @property
    def tokenizer(self):
        return self.corpus.tokenizer

    def configure_model(self, model: ModelConfig) -> ModelConfig:
        self.model_cfg = replace(model, vocab_size=self.corpus.tokenizer.vocab_size)
        return self.model_cfg

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint of this task must match to be resumed: the tokenizer."""
        return self.corpus.tokenizer.identity()

    def checkpoint_meta(self) -> Dict[str, Any]:
        """What else, besides the model config and tokenizer, a resume must match."""
        return {}

    def build_model(self, model_cfg: ModelConfig, parallel):
        return build_model(model_cfg, parallel)

    def load_initial_weights(self, model, layout) -> None:
        """Weights a fresh run starts from, after the initialisation (a pretrained model's, for
        fine-tuning); a language model starts from its initialisation."""

    def next_commands(self, ckpt_dir: str):
        """What to run on the checkpoints next, printed at the end of training."""
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

    def start(self, rank: int, world_size: int, micro_batch: int, seed: int, grad_accum: int = 1) -> None:
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        train = self.corpus.splits["train"]
        if self.model_cfg.has_memory:  # each micro step reads the next segment of every stream
            self.sampler = StreamBatchSampler(train, self.seq_len, micro_batch, rank, world_size, seed)
        else:
            self.sampler = ContiguousBatchSampler(train, self.seq_len, micro_batch, rank, world_size, seed, grad_accum)

    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch()

    def forward(self, engine, batch) -> LMOutput:
        x, y = batch
        if self.model_cfg.has_memory and self.sampler.restarted:
            self.state = None  # a new epoch of the streams: the memory belongs to the old one
        out = engine(x.to(engine.device), y.to(engine.device), None, self.state)
        self.state = out.state
        return out

    def loss(self, out: LMOutput, terms) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total loss, {'task': ..., each named loss reduced over layers})."""
        total, reduced = total_loss(out.task_loss, out.layer_losses, terms)
        return total, {"task": out.task_loss, **reduced}

    def evaluate(self, engine, split: str, max_batches=None) -> Dict[str, float]:
        """Full pass over `split`, shared by every rank (a collective)."""
        c = self.corpus
        # Its own memory from None: the training memory (self.state) is left for the next step.
        return evaluate_lm(engine, self.model_cfg, c.splits[split], self.seq_len, self.micro_batch, self.rank,
                           self.world_size, engine.device, c.units[split], c.metric, max_batches)

    def state_dict(self) -> Dict[str, Any]:
        """The data position (the same on every rank), for the checkpoint's client state."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def rank_state_dict(self) -> Optional[Dict[str, Any]]:
        """This rank's own state for the checkpoint: the memory of its streams (None without memory)."""
        if not self.model_cfg.has_memory:
            return None
        return {"memory": None if self.state is None else [m.detach().cpu() for m in self.state]}

    def load_rank_state_dict(self, state: Optional[Dict[str, Any]], device) -> None:
        if state is not None and state.get("memory") is not None:
            self.state = tuple(m.to(device) for m in state["memory"])
