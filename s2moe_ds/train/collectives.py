"""The trainer's own collectives: votes every rank takes together, and rank averages for logging.
Each is called on every rank at the same point of the loop."""

import threading
from typing import Dict, Iterable

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError


def rank_zero_first(load, poll_s: float = 20.0):
    """load() on rank 0, then on the others once it is done: rank 0 fills a cache (tokenized
    splits, a hub download) that the others then only read. Collective. When rank 0's load fails,
    every rank raises (a ConfigError as a ConfigError, so every rank exits with status 2), instead
    of the others waiting until the launcher kills them. Rank 0 loads in a thread and tells the
    others every `poll_s` that it is still at it, so that a load longer than the collective
    timeout (a first tokenization of a large corpus) is no hang."""
    failure, value = None, None
    if dist.get_rank() == 0:
        outcome = {}

        def run():
            try:
                outcome["value"] = load()
            except Exception as e:
                outcome["failure"] = e
        worker = threading.Thread(target=run, name="rank0-load", daemon=True)
        worker.start()
        while True:
            worker.join(poll_s)
            done = not worker.is_alive()
            failure, value = outcome.get("failure"), outcome.get("value")
            shared = ["working" if not done else None if failure is None
                      else (isinstance(failure, ConfigError), str(failure))]
            dist.broadcast_object_list(shared, src=0)
            if done:
                break
    else:
        shared = ["working"]
        while shared[0] == "working":
            dist.broadcast_object_list(shared, src=0)
    if failure is not None:
        raise failure
    if shared[0] is not None:
        is_config, message = shared[0]
        raise (ConfigError if is_config else RuntimeError)(message if is_config else f"rank 0 failed: {message}")
    if dist.get_rank() != 0:
        value = load()
    return value


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' values, on every rank: ranks that decide to stop must stop
    together, never one of them left waiting inside a collective."""
    # On the accelerator: NCCL refuses CPU tensors (on CPU this is "cpu" and gloo).
    t = torch.tensor([float(value)], device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def rank_average(values: Dict[str, torch.Tensor], keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """values with those of `keys` averaged over all ranks, in one all-reduce."""
    keys = [k for k in keys if k in values]
    if not keys or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    parts = [values[k].detach().float().reshape(-1) for k in keys]
    flat = torch.cat([p.to(parts[0].device) for p in parts])  # on the device: NCCL refuses CPU tensors
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out = dict(values)
    for k, chunk in zip(keys, flat.split([p.numel() for p in parts])):
        out[k] = chunk.reshape(values[k].shape)
    return out
