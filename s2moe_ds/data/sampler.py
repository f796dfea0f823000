"""Training batches of contiguous token windows with an exactly resumable position, and full-split
evaluation batches shared by the ranks."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from ..config import ConfigError


def _num_windows(num_tokens: int, seq_len: int) -> int:
    """Full windows of seq_len + 1 tokens at stride seq_len."""
    return max(num_tokens - 1, 0) // seq_len


class ContiguousBatchSampler:
    """Windows of seq_len + 1 tokens at stride seq_len, shuffled per epoch, shared by the ranks.

    Epoch e visits the windows in a permutation drawn from (seed, e) alone, so any rank can compute
    any batch. Global batch g is the slice [g*B*W, (g+1)*B*W) of that order (B = batch_size,
    W = world_size); rank r takes its positions r, r+W, r+2W, ...: disjoint across ranks. The last
    global batch of an epoch is dropped when incomplete (every rank gets the same number of
    batches); the next epoch starts on its own.

    The position is counted in global batches, so `load_state_dict` continues exactly. It accepts a
    state saved with another world_size or batch_size only if the global batch (batch_size *
    world_size) is the same: the order of windows is then unchanged and just shared differently.
    Any other difference (seq_len, seed, number of tokens, global batch) raises ConfigError,
    because the saved position would mean other data.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int, batch_size: int, rank: int, world_size: int,
                 seed: int) -> None:
        for name, value, minimum in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                     ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfigError(f"sampler.{name}: must be an integer >= {minimum}, got {value!r}")
        if rank >= world_size:
            raise ConfigError(f"sampler.rank: {rank} must be < world_size {world_size}")
        self.tokens_N = tokens_N
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_tokens = int(len(tokens_N))
        self.num_windows = _num_windows(len(tokens_N), self.seq_len)
        self.global_batch = self.batch_size * self.world_size
        self.batches_per_epoch = self.num_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"train.seq_len: the training split has {len(tokens_N)} tokens, {self.num_windows} windows of "
                f"seq_len+1={self.seq_len + 1}, fewer than one global batch of {self.global_batch} "
                f"(micro batch {self.batch_size} x {self.world_size} ranks); lower the sequence length or the "
                "batch size, or use a larger corpus")
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_BT, y_BT), int64: this rank's share of the next global batch; y is x shifted by one."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        order = self._epoch_order()
        start = self.position * self.global_batch
        windows_B = order[start + self.rank:start + self.global_batch:self.world_size]
        starts_B = windows_B * self.seq_len
        index_BT1 = starts_B[:, None] + np.arange(self.seq_len + 1)[None, :]
        window_BT1 = torch.from_numpy(np.asarray(self.tokens_N[index_BT1], dtype=np.int64))
        self.position += 1
        return window_BT1[:, :-1], window_BT1[:, 1:]

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "global_batch": self.global_batch, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        checks = (("seq_len", "train.seq_len"), ("seed", "train.seed"), ("num_tokens", "data"),
                  ("global_batch", "train_micro_batch_size_per_gpu x world size"))
        for key, what in checks:
            if int(state[key]) != getattr(self, key):
                raise ConfigError(
                    f"{what}: the data position was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; resume with the "
                    "settings (and corpus) of the saved run, or start a new run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(tokens_N: np.ndarray, seq_len: int, batch_size: int, rank: int,
                 world_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x_BT, y_BT, mask_BT) over the whole split, in order, without overlap.

    Window i holds tokens [i*seq_len, i*seq_len + seq_len] and predicts tokens i*seq_len+1 ...:
    every token after the first is a target exactly once across all ranks. The last window may be
    shorter; it is padded with 0 and mask 0. Window i goes to rank i % world_size, B windows per
    batch. Every batch has shape [B, seq_len], the last one padded with fully masked rows, and a
    rank with no window (a tiny split) yields one fully masked batch: expert-parallel forwards are
    collectives whose buffers are sized from the local token count, so every rank must bring the
    same shape.
    """
    n = len(tokens_N)
    num_windows = -(-max(n - 1, 0) // seq_len)
    mine = np.arange(rank, num_windows, world_size)
    if len(mine) == 0:
        zeros_BT = torch.zeros(batch_size, seq_len, dtype=torch.long)
        yield zeros_BT, zeros_BT.clone(), zeros_BT.clone()
        return
    offsets_T1 = np.arange(seq_len + 1)
    for b in range(0, len(mine), batch_size):
        starts_B = mine[b:b + batch_size] * seq_len
        # Padding rows start past the end of the split, so the validity test below masks them whole.
        starts_B = np.concatenate([starts_B, np.full(batch_size - len(starts_B), n, dtype=starts_B.dtype)])
        index_BT1 = starts_B[:, None] + offsets_T1[None, :]
        valid_BT1 = index_BT1 < n
        window_BT1 = np.where(valid_BT1, np.asarray(tokens_N[np.minimum(index_BT1, n - 1)], dtype=np.int64), 0)
        window_BT1 = torch.from_numpy(window_BT1)
        mask_BT = torch.from_numpy(valid_BT1[:, 1:].astype(np.int64))
        yield window_BT1[:, :-1], window_BT1[:, 1:], mask_BT
