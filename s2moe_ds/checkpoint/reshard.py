"""Resume on another layout: the ZeRO 1/2 optimizer shards of W ranks with ep_size E, read back
per parameter by its GLOBAL name and written into an engine of any other world size and ep_size.
Each rank reads only what it will hold: the non-expert weights and buffers, its own experts'
files, and the pieces of the saved optimizer partitions that fall into its own partitions.

DeepSpeed's universal checkpoint skips native-MoE expert states; here every rank's shard file is
read weights-only, and for each optimizer group its fragments (DeepSpeed's `param_slice_mappings`:
where each parameter's piece lies in the rank's flat fp32 partition) follow each other in
partition order: the non-expert group is partitioned over all ranks, each expert group over the
ranks that hold the same experts (its expert-data-parallel group). A rank's local expert i is
global expert ep_rank * (num_experts / E) + i, so an expert keeps its id on any layout.

Loading, in two passes over the saved shards, each file memory-mapped and dropped before the next:
first their layout alone (which piece of which parameter each holds, and where it starts in the
parameter); then, after the new engine's flat partitions got Adam state tensors (DeepSpeed creates
them lazily at the first step) and DeepSpeed linked its per-parameter views of them, every piece
that overlaps this rank's fragment of a parameter is copied into its fp32 master weight and both
moments, one state and at most CHUNK_VALUES values per mapping of a shard (the pages a mapping
touched stay resident until it is dropped). No parameter is assembled whole, and a shard that
holds nothing of this rank's is not read at all.
"""

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from ..config import ConfigError
from ..parallel import ExpertLayout
from ..parallel import deepspeed_internals as ds
from . import manifest
from .consolidate import load_global_state
from .safe_load import load_file
from .store import apply_schedule_position

MOMENTS = ("exp_avg", "exp_avg_sq")
EXPERT_FILE = re.compile(r"layer_\d+_expert_(\d+)_mp_rank_\d+_model_states\.pt")
"""DeepSpeed's per-expert file name; the number after 'expert_' is the global expert id."""


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


def read_mapped(path: str):
    """A checkpoint file whose values this rank needs, through the safe loader, its tensors mapped
    from the file: only the values a caller touches are read, and they leave memory with the
    returned object."""
    return load_file(path, mmap=True)


def read_layout(path: str):
    """An optimizer shard read for its layout (param_slice_mappings, groups, step count): mapped
    as read_mapped, and of its tensors only the step count is touched."""
    return load_file(path, mmap=True)


def load_rank_share(engine, layout: ExpertLayout, step_dir: str, meta: Dict, num_experts: int) -> None:
    """Resume `engine` (this rank, laid out as `layout`) from a step folder of another layout
    (`meta`: its meta.json): the module's weights and buffers, then the fp32 master weights, both
    Adam moments and the step count of this rank's optimizer partitions."""
    where = f"--resume: {step_dir}"
    load_global_state(engine.module, rank_module_state(step_dir, layout), layout, where)
    pieces, step = saved_pieces(step_dir, meta, num_experts)
    load_optimizer_share(engine, layout, step_dir, pieces, step)


def rank_module_state(step_dir: str, layout: ExpertLayout) -> Dict[str, torch.Tensor]:
    """The module state (ep_size-1 names) that a rank of `layout` holds: every non-expert weight
    and buffer (the model-states file) and the weights of its own experts (their files, by global
    id); other experts' files are not opened."""
    manifest.verify(step_dir)
    state = dict(read_mapped(os.path.join(step_dir, ds.MODEL_STATES))["module"])
    own = set(layout.global_ids())
    for name in sorted(os.listdir(step_dir)):
        match = EXPERT_FILE.fullmatch(name)
        if match is not None and int(match.group(1)) in own:
            state.update(read_mapped(os.path.join(step_dir, name)))
    return state


@dataclass
class Piece:
    """One saved rank's piece of a parameter: where it lies in that rank's flat partition of
    optimizer group `group` (`start`, `numel`) and where it starts in the flattened parameter."""
    rank: int
    group: int
    start: int
    numel: int
    partition: int
    offset: int = 0


def saved_pieces(step_dir: str, meta: Dict, num_experts: int) -> Tuple[Dict[str, List[Piece]], object]:
    """({global parameter name: its pieces in partition order}, the optimizer's step count) from
    the saved shards' layout alone (each file mapped, no tensor read but the step count)."""
    world, ep = int(meta["world_size"]), int(meta["ep_size"])
    pieces: Dict[str, List[Piece]] = {}
    step = None
    for rank in range(world):
        path = optim_file(step_dir, rank)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume: {path} is missing; resuming on another layout reads every rank's ZeRO "
                              "shard (ZeRO stage 1 or 2)")
        osd = read_layout(path)["optimizer_state_dict"]
        if "param_slice_mappings" not in osd:
            raise ConfigError(f"--resume: {path} is not a ZeRO 1/2 optimizer shard (no param_slice_mappings); "
                              "resuming on another layout needs a run saved with ZeRO stage 1 or 2")
        ep_rank, expert_dp_rank = expert_layout_of(meta, rank)
        layout = ExpertLayout(num_experts, ep, ep_rank)
        groups = osd["base_optimizer_state"]["param_groups"]
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            expert_group = bool(groups[i].get("moe"))
            if rank == 0 and i == 0:
                found = osd["base_optimizer_state"]["state"][i].get("step")
                step = found.clone() if torch.is_tensor(found) else found
            for name, address in mapping.items():
                key = layout.global_param_name(name) if expert_group else name
                pieces.setdefault(key, []).append(Piece(rank, i, int(address.start), int(address.numel),
                                                        expert_dp_rank if expert_group else rank))
        del osd
    for name, parts in pieces.items():
        parts.sort(key=lambda p: p.partition)
        seen = [p.partition for p in parts]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"--resume: {step_dir}: parameter {name} has two pieces of partition {seen}; "
                              "the saved layout is not the one meta.json records")
        offset = 0
        for part in parts:
            part.offset, offset = offset, offset + part.numel
    return pieces, step


def _copies(engine, layout: ExpertLayout, pieces: Dict[str, List[Piece]]):
    """{saved rank: [(group, start in its partition, count, {'fp32'/moment: this rank's view})]}:
    every saved piece that overlaps this rank's fragment of one of its parameters."""
    copies: Dict[int, list] = {}
    for name, p in engine.module.named_parameters():
        gname = layout.global_param_name(name)
        fragment = ds.own_fragment(p, MOMENTS)
        if fragment is None:
            continue
        start, numel, views = fragment
        for piece in pieces[gname]:
            lo, hi = max(start, piece.offset), min(start + numel, piece.offset + piece.numel)
            if lo < hi:
                targets = {key: view.narrow(0, lo - start, hi - lo) for key, view in views.items()}
                copies.setdefault(piece.rank, []).append((piece.group, piece.start + lo - piece.offset, hi - lo,
                                                          targets))
    return copies


def load_optimizer_share(engine, layout: ExpertLayout, step_dir: str, pieces: Dict[str, List[Piece]], step) -> int:
    """Write this rank's fragments of the saved fp32 master weights and moments (saved_pieces)
    into `engine`'s ZeRO 1/2 partitions, from the saved shards that hold any of them, mapped in
    batches; returns how many values it copied (3 per value of its partitions)."""
    names = {layout.global_param_name(n): p for n, p in engine.module.named_parameters()}
    missing = sorted(set(names) - set(pieces))
    if missing:
        raise ConfigError(f"--resume: {step_dir} lacks optimizer state for {missing[:4]}; resume with the model "
                          "that wrote it")
    for gname, p in names.items():
        saved = sum(piece.numel for piece in pieces[gname])
        if saved != p.numel():
            raise ConfigError(f"--resume: {step_dir}: {gname} has {saved} values, this model's {p.numel()}; "
                              "resume with the model that wrote it")
    ds.create_optimizer_states(engine, step, MOMENTS)
    copies = _copies(engine, layout, pieces)
    copied = 0
    with torch.no_grad():
        for rank in sorted(copies):
            for key in ("fp32", *MOMENTS):
                for batch in _batches(copies[rank]):
                    copied += _copy_batch(optim_file(step_dir, rank), key, batch)
    return copied


CHUNK_VALUES = 32 * 2**20
"""How many values (128 MiB of fp32) one mapping of a shard may touch before it is dropped:
touched pages of a mapped file stay resident until it is unmapped."""


def _batches(copies: list):
    """`copies` in runs of at most CHUNK_VALUES values (a larger piece alone)."""
    batch, size = [], 0
    for copy in copies:
        if batch and size + copy[2] > CHUNK_VALUES:
            yield batch
            batch, size = [], 0
        batch.append(copy)
        size += copy[2]
    if batch:
        yield batch


def _copy_batch(path: str, key: str, batch: list) -> int:
    """Copy state `key` ('fp32' or a moment) of each piece of `batch` from the shard at `path`,
    mapped for this batch alone; the number of values copied."""
    osd = read_mapped(path)["optimizer_state_dict"]
    flats, states = osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"]
    for group, start, count, targets in batch:
        source = flats[group] if key == "fp32" else states[group][key]
        targets[key].copy_(source.narrow(0, start, count))
    del osd, flats, states
    return sum(count for _, _, count, _ in batch)


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
    # Mapped: the module's weights in the same file are not read.
    return {k: v for k, v in read_mapped(os.path.join(step_dir, ds.MODEL_STATES)).items()
            if k not in ("module", "optimizer")}

