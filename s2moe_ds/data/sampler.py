"""Training batches of contiguous token windows with an exactly resumable position, and full-split
evaluation batches shared by the ranks, built as they are read."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from ..config import ConfigError

Batch = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(x_BT, y_BT, mask_BT), int64."""


def _num_windows(num_tokens: int, seq_len: int) -> int:
    """Full windows of seq_len + 1 tokens at stride seq_len."""
    return max(num_tokens - 1, 0) // seq_len


def _check_layout(seq_len: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
    for name, value, minimum in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(f"sampler.{name}: must be an integer >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ConfigError(f"sampler.rank: {rank} must be < world_size {world_size}")


def _check_saved(sampler, state: Dict[str, int], checks, why: str) -> None:
    """Refuse a saved position whose `checks` ((key, field named in the error), ...) differ."""
    for key, what in checks:
        if int(state[key]) != getattr(sampler, key):
            raise ConfigError(f"{what}: the data position was saved with {key}={state[key]} but this run has "
                              f"{key}={getattr(sampler, key)}; {why}")


class ContiguousBatchSampler:
    """Windows of seq_len + 1 tokens at stride seq_len, shuffled per epoch, shared by the ranks.

    Epoch e visits the windows in a permutation drawn from (seed, e) alone, so any rank can compute
    any batch. Micro step g is the slice [g*B*W, (g+1)*B*W) of that order (B = batch_size,
    W = world_size); rank r takes its positions r, r+W, r+2W, ...: disjoint across ranks. An
    optimizer step of A = grad_accum micro steps reads the B*W*A windows that follow; the last
    optimizer step of an epoch is dropped when incomplete (every rank gets the same number of
    batches); the next epoch starts on its own.

    The position is saved as a window offset, which no world size enters, so `load_state_dict`
    continues exactly on any layout that reads as many windows per optimizer step (B*W*A): 2 ranks
    x 16 x 1 step as 1 rank x 16 x 2 (the same windows in each optimizer step) or 1 rank x 32 x 1.
    Any other difference (seq_len, seed, number of tokens, windows per optimizer step) raises
    ConfigError, because the saved position would mean other data.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int, batch_size: int, rank: int, world_size: int,
                 seed: int, grad_accum: int = 1) -> None:
        _check_layout(seq_len, batch_size, rank, world_size, seed)
        if not isinstance(grad_accum, (int, np.integer)) or grad_accum < 1:
            raise ConfigError(f"gradient_accumulation_steps: must be an integer >= 1, got {grad_accum!r}")
        self.tokens_N = tokens_N
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_tokens = int(len(tokens_N))
        self.num_windows = _num_windows(len(tokens_N), self.seq_len)
        self.global_batch = self.batch_size * self.world_size
        self.grad_accum = int(grad_accum)
        self.step_windows = self.global_batch * self.grad_accum
        self.batches_per_epoch = (self.num_windows // self.step_windows) * int(grad_accum)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"train.seq_len: the training split has {len(tokens_N)} tokens, {self.num_windows} windows of "
                f"seq_len+1={self.seq_len + 1}, fewer than one optimizer step of {self.step_windows} "
                f"(micro batch {self.batch_size} x {self.world_size} ranks x {grad_accum} accumulation steps); lower "
                "the sequence length or the batch size, or use a larger corpus")
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
                "global_batch": self.global_batch, "num_tokens": self.num_tokens,
                "windows": self.position * self.global_batch, "step_windows": self.step_windows}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        # Positions saved before the offset existed were counted in micro steps, and their
        # accumulation was not recorded: it is taken to be this run's, as it was then.
        state = {"windows": int(state["position"]) * int(state["global_batch"]),
                 "step_windows": int(state["global_batch"]) * self.grad_accum, **state}
        checks = (("seq_len", "train.seq_len"), ("seed", "train.seed"), ("num_tokens", "data"),
                  ("step_windows", "train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size"))
        _check_saved(self, state, checks, "resume with the settings (and corpus) of the saved run, or start a new run")
        windows = int(state["windows"])
        if windows % self.global_batch:
            raise ConfigError(f"train_micro_batch_size_per_gpu: the data position ({windows} windows into epoch "
                              f"{state['epoch']}) is not a whole number of this run's micro steps of "
                              f"{self.global_batch} windows; resume with the saved run's micro batch")
        self.epoch, self.position = int(state["epoch"]), windows // self.global_batch


class EvalBatches:
    """Evaluation batches made one at a time as they are read, from the (memory-mapped) token array.

    len() is known before any batch is built, so every rank can agree on the number of forwards in
    one collective; iterating builds batch i only when it is asked for, and never more than len()
    batches (`max_batches` is applied here, before any work). Iterable again from the start.
    """

    def __init__(self, count: int, make: Callable[[int], Iterator[Batch]]) -> None:
        self._count, self._make = int(count), make

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Batch]:
        return self._make(self._count)


def _capped(count: int, max_batches: Optional[int]) -> int:
    return count if max_batches is None else min(count, max(int(max_batches), 0))


def eval_batches(tokens_N: np.ndarray, seq_len: int, batch_size: int, rank: int, world_size: int,
                 max_batches: Optional[int] = None) -> EvalBatches:
    """(x_BT, y_BT, mask_BT) over the whole split (or its first `max_batches` batches on this
    rank), in order, without overlap, each batch built when it is read.

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
    mine = len(range(rank, num_windows, world_size))
    stride = batch_size * world_size  # windows between the first of one batch and the next's

    def make(count: int) -> Iterator[Batch]:
        if mine == 0:
            for _ in range(count):
                zeros_BT = torch.zeros(batch_size, seq_len, dtype=torch.long)
                yield zeros_BT, zeros_BT.clone(), zeros_BT.clone()
            return
        offsets_T1 = np.arange(seq_len + 1)
        for b in range(count):
            first = rank + b * stride
            starts_B = np.arange(first, min(first + stride, num_windows), world_size) * seq_len
            # Padding rows start past the end of the split, so the validity test below masks them whole.
            starts_B = np.concatenate([starts_B, np.full(batch_size - len(starts_B), n, dtype=starts_B.dtype)])
            index_BT1 = starts_B[:, None] + offsets_T1[None, :]
            valid_BT1 = index_BT1 < n
            window_BT1 = np.where(valid_BT1, np.asarray(tokens_N[np.minimum(index_BT1, n - 1)], dtype=np.int64), 0)
            window_BT1 = torch.from_numpy(window_BT1)
            mask_BT = torch.from_numpy(valid_BT1[:, 1:].astype(np.int64))
            yield window_BT1[:, :-1], window_BT1[:, 1:], mask_BT
    return EvalBatches(_capped(max(-(-mine // batch_size), 1), max_batches), make)


class StreamBatchSampler:
    """Transformer-XL's ordered reading: the split cut into S = batch_size * world_size contiguous
    streams of equal length (the remainder of fewer than S tokens is left out), each read segment
    after segment, so that a model with memory sees every stream in order.

    Rank r holds streams r*B .. r*B + B - 1 (B = batch_size), row b of its batches being stream
    r*B + b. Segment p of every stream covers its tokens [p*seq_len, p*seq_len + seq_len]. After
    the last full segment an epoch ends and the streams start again from their beginning, in the
    same order (the original's protocol); `restarted` is then True for that batch, so the caller
    drops the memory of the old epoch.

    The position is counted in segments; `load_state_dict` refuses a state of another layout
    (seq_len, number of tokens, streams, world size), because memory is per rank and row: the same
    data cut otherwise would pair rows with another stream's memory.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int, batch_size: int, rank: int, world_size: int,
                 seed: int = 0) -> None:
        _check_layout(seq_len, batch_size, rank, world_size, seed)
        self.tokens_N = tokens_N
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.num_tokens = int(len(tokens_N))
        self.streams = self.batch_size * self.world_size
        self.stream_len = self.num_tokens // self.streams
        self.batches_per_epoch = _num_windows(self.stream_len, self.seq_len)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"train.seq_len: the training split has {self.num_tokens} tokens, {self.stream_len} per stream of "
                f"{self.streams} streams (micro batch {self.batch_size} x {self.world_size} ranks), fewer than one "
                f"segment of seq_len+1={self.seq_len + 1}; lower the sequence length or the batch size, or use a "
                "larger corpus")
        self.epoch = 0
        self.position = 0
        self.restarted = False

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x_BT, y_BT), int64: the next segment of this rank's streams; y is x shifted by one."""
        self.restarted = self.position == 0
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self.restarted = True
        streams_B = np.arange(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        starts_B = streams_B * self.stream_len + self.position * self.seq_len
        index_BT1 = starts_B[:, None] + np.arange(self.seq_len + 1)[None, :]
        window_BT1 = torch.from_numpy(np.asarray(self.tokens_N[index_BT1], dtype=np.int64))
        self.position += 1
        return window_BT1[:, :-1], window_BT1[:, 1:]

    def state_dict(self) -> Dict[str, int]:
        return {"order": "streams", "epoch": self.epoch, "position": self.position, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("order") != "streams":
            raise ConfigError("model.backbone: the checkpoint's data position is of shuffled windows (a backbone "
                              "without memory), this run reads ordered streams; resume with the saved model")
        checks = (("seq_len", "train.seq_len"), ("num_tokens", "data"), ("batch_size", "train_micro_batch_size_per_gpu"),
                  ("world_size", "the world size"))
        _check_saved(self, state, checks, "each rank's memory belongs to its streams, so resume with the saved "
                     "run's settings, corpus and process count, or start a new run")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def stream_eval_batches(tokens_N: np.ndarray, seq_len: int, streams: int, rank: int, world_size: int,
                        max_batches: Optional[int] = None) -> EvalBatches:
    """(x_BT, y_BT, mask_BT) over the whole split (or its first `max_batches` segments) as `streams`
    contiguous streams read in order, for a model that keeps memory along each row; each segment
    built when it is read.

    Stream s holds tokens [s*L, (s+1)*L] (L = (n - 1) // streams; the last stream runs to the end of
    the split, so every token after the first is a target exactly once). Rank r holds streams
    r, r + W, ... in its rows, B = ceil(streams / W) rows on every rank (rows past the last stream
    fully masked), and every rank yields the same number of segments of the same shape, since an
    expert-parallel forward is a collective. Each stream's segments are those a single process
    would read, so the result does not depend on W.
    """
    n = len(tokens_N)
    length = max(n - 1, 0) // streams
    if length == 0:
        raise ConfigError(f"eval streams: the split has {n} tokens, fewer than 1 per stream of {streams}; "
                          "lower model.backbone_config.eval_streams")
    rows = -(-streams // world_size)
    mine = np.arange(rank, streams, world_size)
    ends_S = np.minimum(np.arange(1, streams + 1) * length, n - 1)
    ends_S[-1] = n - 1
    longest = int((ends_S - np.arange(streams) * length).max())

    def make(count: int) -> Iterator[Batch]:
        for pos in range(0, count * seq_len, seq_len):
            x_BT = np.zeros((rows, seq_len), dtype=np.int64)
            y_BT = np.zeros((rows, seq_len), dtype=np.int64)
            mask_BT = np.zeros((rows, seq_len), dtype=np.int64)
            for row, s in enumerate(mine):
                start, end = s * length + pos, ends_S[s]  # targets start+1 .. end
                count_T = max(min(seq_len, end - start), 0)
                if count_T:
                    x_BT[row, :count_T] = tokens_N[start:start + count_T]
                    y_BT[row, :count_T] = tokens_N[start + 1:start + count_T + 1]
                    mask_BT[row, :count_T] = 1
            yield torch.from_numpy(x_BT), torch.from_numpy(y_BT), torch.from_numpy(mask_BT)
    return EvalBatches(_capped(-(-longest // seq_len), max_batches), make)
