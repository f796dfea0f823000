"""Tasks: what the trainer trains on. A task supplies the data, the batches, the forward and its
loss, the evaluator and its own state for the checkpoint; the trainer supplies everything else
(engine, layout, schedule, hooks, checkpoints, signals). Language modelling is the one task now.
"""

from dataclasses import asdict, replace
from typing import Any, Dict, Tuple

import deepspeed.comm as dist
import torch

from ..data import ContiguousBatchSampler, DataConfig, eval_batches, prepare_corpus
from ..eval import evaluate_split
from ..models import LMOutput, ModelConfig
from ..moe import total_loss


class LanguageModelingTask:
    """Next-token prediction on a corpus: contiguous windows in a seeded order, validation as BPC
    (character and byte corpora) or word perplexity over full splits.

    The model's `state` (a backbone's memory) is carried from one training forward to the next."""

    def __init__(self, data: DataConfig, seq_len: int) -> None:
        self.data = data
        self.seq_len = seq_len
        self.corpus = None
        self.sampler = None
        self.state = None

    def prepare(self) -> None:
        """Collective: rank 0 tokenizes and fills the cache; the others then only read it."""
        if dist.get_rank() == 0:
            self.corpus = prepare_corpus(self.data)
        dist.barrier()
        if dist.get_rank() != 0:
            self.corpus = prepare_corpus(self.data)

    @property
    def tokenizer(self):
        return self.corpus.tokenizer

    def configure_model(self, model: ModelConfig) -> ModelConfig:
        return replace(model, vocab_size=self.corpus.tokenizer.vocab_size)

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint of this task must match to be resumed: the tokenizer."""
        return self.corpus.tokenizer.identity()

    def run_record(self) -> Dict[str, Any]:
        return {"data": asdict(self.data), "tokenizer": self.identity(), "corpus": self.corpus.identity}

    def describe(self) -> str:
        return (f"data {self.corpus.identity.get('dataset')}, {len(self.corpus.splits['train']):,} train tokens, "
                f"tokenizer {self.identity()['kind']}")

    def start(self, rank: int, world_size: int, micro_batch: int, seed: int) -> None:
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.sampler = ContiguousBatchSampler(self.corpus.splits["train"], self.seq_len, micro_batch, rank,
                                              world_size, seed)

    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.next_batch()

    def forward(self, engine, batch) -> LMOutput:
        x, y = batch
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
        return evaluate_split(lambda x, y, m: engine(x, y, m),
                              eval_batches(c.splits[split], self.seq_len, self.micro_batch, self.rank, self.world_size),
                              engine.device, c.units[split], len(c.splits[split]), c.metric, max_batches)

    def state_dict(self) -> Dict[str, Any]:
        """The data position (the same on every rank), for the checkpoint's client state."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
