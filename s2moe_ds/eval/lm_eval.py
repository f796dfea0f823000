"""Full passes over a split: total NLL across ranks, reported as BPC or word-level perplexity."""

import itertools
import math
from typing import Callable, Dict, Optional

import deepspeed.comm as dist
import torch

from ..data import eval_batches, stream_eval_batches


def evaluate_split(forward: Callable, batches, device, unit_count: int, split_tokens: int, metric: str,
                   max_batches: Optional[int] = None) -> Dict[str, float]:
    """Sum the next-token NLL of `batches` ((x, y, mask) per batch) over every rank.

    `batches` is read one batch at a time: with a length (eval_batches, stream_eval_batches, a
    list) no batch past the first `max_batches` is built or read; a plain iterator is read up to
    `max_batches` first, since its length must be known before the first (collective) forward.

    forward(x, y, mask) -> LMOutput. Every rank runs the same number of forwards, padding with
    fully masked batches, because an expert-parallel forward is a collective: a rank that stopped
    early would leave the others waiting in the all-to-all. Returns nll per token, and 'bpc' (nats
    per unit / ln 2) or 'ppl' (exp of nats per word), with the split's `unit_count` units (bytes,
    characters or words) scaled by the share of its `split_tokens` that were predicted.
    """
    if not hasattr(batches, "__len__"):  # a plain iterator: its length is known only by reading it
        batches = list(itertools.islice(batches, max_batches))
    count = len(batches) if max_batches is None else min(len(batches), max_batches)
    # Collectives take tensors on the device (NCCL refuses CPU tensors).
    n = torch.tensor([count], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if count == 0:
        raise ValueError("evaluation split is empty on this rank and every other")
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    # One batch at a time, as it is built; a rank with fewer batches repeats its first one fully
    # masked, which it keeps (one batch), so that it can join the others' collective forwards.
    mine = itertools.islice(batches, count)
    first = None
    with torch.no_grad():
        for i in range(int(n.item())):
            if i < count:
                x, y, mask = next(mine)
                first = (x, y, mask) if first is None else first
            else:
                x, y, mask = (*first[:2], torch.zeros_like(first[2]))
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            out = forward(x, y, mask)
            count_T = mask.float().sum()
            nll += out.task_loss.double().cpu() * count_T.double().cpu()
            tokens += count_T.double().cpu()
    totals = torch.stack([nll, tokens]).to(device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    nll_total, token_total = totals.cpu().tolist()
    units = unit_count * token_total / max(split_tokens - 1, 1)
    result = {"nll_per_token": nll_total / max(token_total, 1.0), "tokens": token_total}
    if metric == "bpc":
        result["bpc"] = nll_total / math.log(2) / units
    else:
        result["ppl"] = math.exp(nll_total / units)
    return result


def evaluate_lm(model_forward: Callable, model_cfg, tokens_N, seq_len: int, batch_size: int, rank: int,
                world_size: int, device, unit_count: int, metric: str,
                max_batches: Optional[int] = None) -> Dict[str, float]:
    """evaluate_split over a whole split in the protocol of the model's backbone.

    model_forward(x, y, mask, state) -> LMOutput. A model without memory reads windows of seq_len,
    batch_size per batch. A model with memory (Transformer-XL) reads the split as
    backbone_config.eval_streams ordered streams in segments of backbone_config.eval_tgt_len
    (default seq_len), carrying its state along them from None; batch_size does not apply."""
    if not model_cfg.has_memory:
        batches = eval_batches(tokens_N, seq_len, batch_size, rank, world_size, max_batches)
        return evaluate_split(lambda x, y, m: model_forward(x, y, m, None), batches, device, unit_count,
                              len(tokens_N), metric, max_batches)
    s = model_cfg.backbone_config
    state = None

    def forward(x, y, m):
        nonlocal state
        out = model_forward(x, y, m, state)
        state = out.state
        return out
    return evaluate_split(forward, stream_eval_batches(tokens_N, s.eval_tgt_len or seq_len, s.eval_streams, rank,
                                                       world_size, max_batches),
                          device, unit_count, len(tokens_N), metric, max_batches)
