"""Full passes over a split: total NLL across ranks, reported as BPC or word-level perplexity."""

import math
from typing import Callable, Dict, Optional

import deepspeed.comm as dist
import torch


def evaluate_split(forward: Callable, batches, device, unit_count: int, split_tokens: int, metric: str,
                   max_batches: Optional[int] = None) -> Dict[str, float]:
    """Sum the next-token NLL of `batches` ((x, y, mask) per batch) over every rank.

    forward(x, y, mask) -> LMOutput. Every rank runs the same number of forwards, padding with
    fully masked batches, because an expert-parallel forward is a collective: a rank that stopped
    early would leave the others waiting in the all-to-all. Returns nll per token, and 'bpc' (nats
    per unit / ln 2) or 'ppl' (exp of nats per word), with the split's `unit_count` units (bytes,
    characters or words) scaled by the share of its `split_tokens` that were predicted.
    """
    batches = list(batches)
    if max_batches is not None:
        batches = batches[:max_batches]
    # Collectives take tensors on the device (NCCL refuses CPU tensors).
    n = torch.tensor([len(batches)], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    if not batches:
        raise ValueError("evaluation split is empty on this rank and every other")
    nll = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i in range(int(n.item())):
            x, y, mask = batches[i] if i < len(batches) else (*batches[0][:2], torch.zeros_like(batches[0][2]))
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            out = forward(x, y, mask)
            count = mask.float().sum()
            nll += out.task_loss.double().cpu() * count.double().cpu()
            tokens += count.double().cpu()
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
