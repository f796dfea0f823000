"""Resume on another layout: the ZeRO 1/2 optimizer shards of W ranks with ep_size E, read back
per parameter by its GLOBAL name and written into an engine of any other world size and ep_size.

DeepSpeed's universal checkpoint skips native-MoE expert states; here every rank's shard file is
read weights-only, and for each optimizer group its fragments (DeepSpeed's `param_slice_mappings`:
where each parameter's piece lies in the rank's flat fp32 partition) are joined in partition
order: the non-expert group is partitioned over all ranks, each expert group over the ranks that
hold the same experts (its expert-data-parallel group). A rank's local expert i is global expert
ep_rank * (num_experts / E) + i, so an expert keeps its id on any layout. What comes back per
parameter is its fp32 master weight and Adam's two moments; the step count is per group.

Loading into the new engine: its flat partitions get Adam state tensors (DeepSpeed creates them
lazily at the first step), DeepSpeed links its per-parameter views of them, and each rank copies
its own fragment of every full tensor through DeepSpeed's public `safe_set_full_*` functions.
"""

import os
from typing import Dict, List, Tuple

import torch

from ..config import ConfigError
from ..parallel import ExpertLayout
from ..parallel import deepspeed_internals as ds
from .safe_load import load_file
from .store import apply_schedule_position

MOMENTS = ("exp_avg", "exp_avg_sq")


def optim_file(step_dir: str, rank: int) -> str:
    return os.path.join(step_dir, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


def expert_layout_of(meta: Dict, rank: int) -> Tuple[int, int]:
    """(ep_rank, rank within its expert-data-parallel group) of a saved rank: from meta.json's
    'expert_ranks' when recorded, else DeepSpeed's default grouping (expert-parallel groups of
    consecutive ranks)."""
    recorded = meta.get("expert_ranks")
    if recorded is not None:
        ep_rank, expert_dp_rank = recorded[rank]
        return int(ep_rank), int(expert_dp_rank)
    ep = int(meta["ep_size"])
    return rank % ep, rank // ep


def global_optimizer_state(step_dir: str, meta: Dict, num_experts: int) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Dict]:
    """({global parameter name: {'fp32', 'exp_avg', 'exp_avg_sq'}: flat fp32 tensors},
    {'step': the optimizer's step count}) from a step folder of any layout."""
    world, ep = int(meta["world_size"]), int(meta["ep_size"])
    pieces: Dict[str, List[Tuple[int, Dict[str, torch.Tensor]]]] = {}
    info = {}
    for rank in range(world):
        path = optim_file(step_dir, rank)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: {path} is missing; resuming on another layout reads every rank's ZeRO "
                              "shard (ZeRO stage 1 or 2)")
        osd = load_file(path)["optimizer_state_dict"]
        if "param_slice_mappings" not in osd:
            raise ConfigError(f"--resume: {path} is not a ZeRO 1/2 optimizer shard (no param_slice_mappings); "
                              "resuming on another layout needs a run saved with ZeRO stage 1 or 2")
        ep_rank, expert_dp_rank = expert_layout_of(meta, rank)
        layout = ExpertLayout(num_experts, ep, ep_rank)
        groups = osd["base_optimizer_state"]["param_groups"]
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            expert_group = bool(groups[i].get("moe"))
            partition = expert_dp_rank if expert_group else rank
            flat = osd["single_partition_of_fp32_groups"][i]
            state = osd["base_optimizer_state"]["state"][i]
            info.setdefault("step", state.get("step"))
            for name, address in mapping.items():
                start, numel = int(address.start), int(address.numel)
                tensors = {"fp32": flat.narrow(0, start, numel)}
                for key in MOMENTS:
                    tensors[key] = state[key].narrow(0, start, numel)
                key = layout.global_param_name(name) if expert_group else name
                pieces.setdefault(key, []).append((partition, tensors))
    full = {}
    for name, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        seen = [p for p, _ in parts]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"--resume: {step_dir}: parameter {name} has two pieces of partition {seen}; "
                              "the saved layout is not the one meta.json records")
        full[name] = {k: torch.cat([t[k] for _, t in parts]) for k in ("fp32", *MOMENTS)}
    return full, info


def engine_global_state(engine, layout: ExpertLayout) -> Dict[str, Dict[str, torch.Tensor]]:
    """The live engine's fp32 weights and moments by global name (a collective: every rank calls
    it; each returns its own experts and every non-expert parameter)."""
    ds.link_optimizer_states(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        entry = {"fp32": ds.full_fp32_param(p).detach().float().flatten().cpu()}
        for key in MOMENTS:
            value = ds.full_optimizer_state(p, key)
            entry[key] = None if value is None else value.detach().float().flatten().cpu()
        out[layout.global_param_name(name)] = entry
    return out


def load_global_optimizer_state(engine, layout: ExpertLayout, full: Dict[str, Dict[str, torch.Tensor]],
                                info: Dict, where: str) -> None:
    """Write `full` (global_optimizer_state) into this rank's engine: weights, master weights,
    moments and step count."""
    names = {layout.global_param_name(n): (n, p) for n, p in engine.module.named_parameters()}
    missing = sorted(set(names) - set(full))
    if missing:
        raise ConfigError(f"--resume: {where} lacks optimizer state for {missing[:4]}; resume with the model "
                          "that wrote it")
    ds.create_optimizer_states(engine, info["step"], MOMENTS)
    with torch.no_grad():
        for gname, (name, p) in names.items():
            entry = full[gname]
            if entry["fp32"].numel() != p.numel():
                raise ConfigError(f"--resume: {where}: {gname} has {entry['fp32'].numel()} values, this model's "
                                  f"{p.numel()}; resume with the model that wrote it")
            value = entry["fp32"].view(p.shape).to(p.device)
            p.data.copy_(value.to(p.dtype))
            ds.set_full_fp32_param(p, value)
            for key in MOMENTS:
                ds.set_full_optimizer_state(p, entry[key].view(p.shape).to(p.device), key)


def restore_engine_counters(engine, client: Dict) -> None:
    """The LR schedule and the engine's step counters, from the model-states file's client state."""
    if engine.lr_scheduler is not None and client.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(client["lr_scheduler"])
        apply_schedule_position(engine)  # else the first step would run at the new engine's rate (0 in warmup)
    ds.set_engine_counters(engine, client.get("global_steps", 0), client.get("global_samples", 0),
                           client.get("skipped_steps", 0))


def reseed(seed: int, step: int, rank: int) -> None:
    """The randomness after a reshard, from (seed, step, global rank) alone."""
    import random

    import numpy as np
    state = np.random.SeedSequence([seed, step, rank]).generate_state(4)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[2]))


def saved_client_state(step_dir: str) -> Dict:
    """The model-states file's client state (our meta, the sampler, DeepSpeed's counters)."""
    return {k: v for k, v in load_file(os.path.join(step_dir, ds.MODEL_STATES)).items()
            if k not in ("module", "optimizer")}

