"""The global gradient norm with experts, for clipping: every shared gradient once (the ranks
hold the same, all-reduced one) and every expert once (each expert-parallel rank holds its own
experts; the world_size / ep_size ranks of an expert-data-parallel group hold the same ones).
ZeRO 1 and 2 compute it so themselves; ZeRO 0 gets it from here (deepspeed_internals.replace_zero0_clipping)."""

from typing import Dict, List

import deepspeed.comm as dist
import torch

from . import deepspeed_internals as ds


def global_grad_norm(params: List[torch.nn.Parameter]) -> torch.Tensor:
    """The 2-norm over every gradient of the model, in fp32; collective (every rank calls it)."""
    shared_sq = None
    expert_sq: Dict[str, torch.Tensor] = {}
    for p in params:
        if p.grad is None:
            continue
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        if ds.is_expert_param(p):
            name = ds.expert_group_name(p)
            expert_sq[name] = expert_sq[name] + sq if name in expert_sq else sq
        else:
            shared_sq = sq if shared_sq is None else shared_sq + sq
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device) if shared_sq is None else shared_sq
    # Every rank calls the same collectives: the group names are the model's, the same on each rank.
    names = sorted(expert_sq)
    if names and dist.is_initialized() and dist.get_world_size() > 1:
        per_group = torch.stack([expert_sq[n] for n in names])
        dist.all_reduce(per_group)
        replicas = torch.tensor([dist.get_world_size() / ds.expert_parallel_world_size(n) for n in names],
                                dtype=torch.float32, device=device)
        total = total + (per_group / replicas).sum()
    elif names:
        total = total + sum(expert_sq[n] for n in names)
    return total.sqrt()


def clip_grad_norm(params: List[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), as torch and DeepSpeed do, with
    the global norm above; returns that norm."""
    norm = global_grad_norm(params)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm
