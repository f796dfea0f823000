"""Checkpoints that survive a kill mid-save, and their exact resume.

Layout under <out_dir>/checkpoints/:
    step00000100/           DeepSpeed's files (model states, per-expert files, ZeRO optimizer shards)
        rng_rank<r>.pt      each rank's RNG states (dropout, S2MoE noise, router sampling)
        state_rank<r>.pt    each rank's own task state, where the task has one (a backbone's memory)
        meta.json           format, layout, model config and tokenizer a resume must match
        tokenizer.json      the run's tokenizer
        MANIFEST.json       size and SHA-256 of every file above (manifest.py)
        COMPLETE            written last, after every rank finished writing
    latest                  the tag of the newest COMPLETE checkpoint, replaced atomically

A run killed while saving leaves a folder without COMPLETE and `latest` still naming the previous
checkpoint, which stays on disk: older checkpoints are pruned only after a newer one is complete.
A write that fails on any rank (a full disk) stops every rank with the path, and the folder is
removed. `latest` has DeepSpeed's own format, so `engine.load_checkpoint(dir)` finds it too; a
resume does not trust it blindly: it takes the newest complete step folder whose files match
their manifest, and says which newer ones it skipped and why.

Only folders named as `step_tag` names them (step + the zero-padded step), whose COMPLETE records
that step, are checkpoints: a copy or rename (`step_best`, an older step copied under a newer name)
is ignored, and named once; they are ordered by step. A save never overwrites or deletes a
complete folder: one already holding its step (from a continuation that a resume did not take) is
set aside as `superseded_<tag>`; only a folder a killed save left without COMPLETE is replaced.
"""

import errno
import json
import os
import random
import re
import shutil
import stat
from typing import Any, Callable, Dict, List, Optional, Tuple

import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError, without_implementation_fields
from ..fileio import TMP_SUFFIX, atomic_write_text
from ..models import model_config_from_dict
from ..parallel import deepspeed_internals as ds
from . import manifest
from .compat import read_meta_file
from .safe_load import check_step_folder, load_file

LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
TOKENIZER = "tokenizer.json"


SET_ASIDE = ("poisoned", "superseded")
"""set_aside's prefixes: folders kept for inspection, never resumed, pruned or overwritten."""
_STEP_NAME = re.compile(r"step(\d{8,})")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def step_of_name(name: str) -> Optional[int]:
    """The step a folder name of `step_tag`'s form names; None for any other name."""
    match = _STEP_NAME.fullmatch(name)
    if match is None or step_tag(int(match.group(1))) != name:
        return None
    return int(match.group(1))


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


_noted = set()


def _note_once(key, message: str) -> None:
    if key not in _noted and _rank0():
        _noted.add(key)
        print(message, flush=True)


def _ours_silently(name: str) -> bool:
    """Entries of checkpoints/ the run writes itself that are not step folders."""
    return (name == LATEST or name in ds.RECOVERY_SCRIPTS or name.startswith(tuple(f"{w}_" for w in SET_ASIDE))
            or (name.startswith(".") and name.endswith(TMP_SUFFIX)))


def _recorded_step(step_dir: str) -> Optional[str]:
    """What COMPLETE records (a save writes the step); None without a COMPLETE file; OSError when
    it cannot be read."""
    path = os.path.join(step_dir, COMPLETE)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return "(not a regular file)"
        with open(path, errors="replace") as f:
            return f.read(64).strip()
    except FileNotFoundError:
        return None


def _complete_step(ckpt_dir: str, name: str) -> Optional[int]:
    """The step of checkpoints/<name> if it is a complete step folder; else None, with a note
    (once, rank 0) for an entry that looks like none of the run's own."""
    if _ours_silently(name):
        return None
    path = os.path.join(ckpt_dir, name)
    step = step_of_name(name)
    if step is None:
        why = "not a step folder name (step + the 8-digit step, as a save names it)"
    elif os.path.islink(path) or not os.path.isdir(path):
        why = "a symbolic link or a file, not a folder a save wrote"
    else:
        try:
            recorded = _recorded_step(path)
        except OSError as e:
            recorded = e
        if recorded is None or recorded == str(step):
            return step if recorded is not None else None  # no COMPLETE: a save that did not finish
        if isinstance(recorded, OSError):
            why = (f"its {COMPLETE} cannot be read ({type(recorded).__name__}: {recorded.strerror or recorded}); if "
                   "it is a checkpoint of the run, give yourself read permission on the folder and its files")
        else:
            why = f"its {COMPLETE} records step {recorded[:20]!r}, not {step}: a copy or rename of another folder"
    _note_once((os.path.realpath(ckpt_dir), name, why),
               f"checkpoints: ignored {path}: {why}; only the run's own step folders are resumed, pruned or "
               "consolidated")
    return None


def _rng_state() -> Dict[str, Any]:
    # "accel": the device's generator (CUDA's on a GPU), which draws the noise, dropout and
    # DeepSpeed's routing randomness there; on the CPU accelerator it is the CPU generator again.
    # numpy's state as tensors and numbers, so that the file loads weights-only.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "accel": get_accelerator().get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "accel" in state:  # checkpoints written before it was saved lack it
        get_accelerator().set_rng_state(state["accel"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # earlier checkpoints: numpy's own tuple
    random.setstate(state["python"])


def _read_latest(ckpt_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """(the step folder name `latest` holds, why it holds none); (None, None) without a `latest`.
    Only a regular file is read (a save writes one; a link could point at any file, a FIFO would
    block), and what is no step folder's name is never quoted back."""
    path = os.path.join(ckpt_dir, LATEST)
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            return None, f"is {kind}, not the file a save writes"
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            name = f.read(64).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read ({type(e).__name__}: {e.strerror or e})"
    if step_of_name(name) is None:
        return None, "names no step folder (a save writes step + the 8-digit step there)"
    return name, None


def latest_tag(ckpt_dir: str) -> Optional[str]:
    """The tag `latest` names, if it names a complete checkpoint; None when there is none yet."""
    path = os.path.join(ckpt_dir, LATEST)
    tag, why = _read_latest(ckpt_dir)
    if tag is None and why is None:
        return None
    if why is None and tag not in complete_tags(ckpt_dir):
        why = f"names {tag}, which is not a complete checkpoint of the run (no {COMPLETE} file)"
    if why is not None:
        raise ConfigError(f"{path} {why}; --resume (and evaluate, consolidate) take the newest complete step folder "
                          "that verifies instead; delete nothing")
    return tag


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank (a full disk, a lost mount): raised on every rank."""


def _all_ranks_wrote(failure: Optional[str], step_dir: str, ckpt_dir: str, remove: bool = True,
                     advice: Optional[str] = None) -> None:
    """A collective: every rank learns whether any rank's writes failed; then all raise together
    (none is left waiting in the next barrier), after rank 0 removed the incomplete folder (when
    `remove`: the save had started writing it). `advice`, the failing rank's sentence on what to
    do, replaces the one for a write (free space)."""
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if failure is None else (failure, advice))
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if not bad:
        return
    if dist.get_rank() == 0 and remove:
        shutil.rmtree(step_dir, ignore_errors=True)
    previous = None
    try:
        previous = latest_tag(ckpt_dir)
    except ConfigError:
        pass
    kept = f"the previous checkpoint {os.path.join(ckpt_dir, previous)} and '{LATEST}' are unchanged" if previous \
        else "no earlier checkpoint exists"
    rank, (why, advice) = bad[0]
    advice = advice or f"Free space on {ckpt_dir}'s file system (or point --out-dir elsewhere) and resume"
    raise CheckpointWriteError(f"checkpoint {step_dir}: writing failed on rank {rank}: {why}; {kept}. {advice}")


def complete_tags(ckpt_dir: str) -> List[str]:
    """Step folders with COMPLETE, newest first: named as `step_tag` names them, COMPLETE
    recording that step. Any other entry is ignored (named once on rank 0, unless the run wrote it:
    `latest`, set-aside folders, temporary files)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        step = _complete_step(ckpt_dir, name)
        if step is not None:
            found.append((step, name))
    return [name for _, name in sorted(found, reverse=True)]


def _problems_on_all_ranks(step_dir: str) -> List[str]:
    """What is wrong with the folder's files, each rank hashing its share (collective with a
    process group); a folder found sound is remembered, so that `manifest.verify` skips it."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    found = manifest.problems(step_dir, rank, world)
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, found)
        found = [p for part in everyone for p in part]
    if not found:
        manifest.remember_verified(step_dir)
    return found


def newest_verified(ckpt_dir: str, what: str = "--resume") -> Optional[str]:
    """The newest complete step folder whose files match its manifest (None: no complete one).
    Newer folders that fail, and a `latest` that names something else, are reported on rank 0
    and skipped; when every complete folder fails, ConfigError lists why. With a process group,
    the ranks verify their shares of each folder's files in parallel."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    skipped = []
    pointer = os.path.join(ckpt_dir, LATEST)
    named, why = _read_latest(ckpt_dir)
    tags = complete_tags(ckpt_dir)
    if why is not None and tags:
        skipped.append(f"'{pointer}' {why}")
    elif named is not None and tags and named != tags[0]:
        skipped.append(f"'{pointer}' names {named}, not the newest complete step folder {tags[0]}")
    chosen = None
    for tag in tags:
        found = _problems_on_all_ranks(os.path.join(ckpt_dir, tag))
        if not found:
            chosen = tag
            break
        skipped.append(f"{tag}: {found[0]}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""))
    if chosen is None and tags:
        raise manifest.CorruptCheckpointError(
            f"{what}: no step folder of {ckpt_dir} matches its manifest: {'; '.join(skipped)}; restore the files "
            "or use another copy of the run")
    if skipped and rank == 0:
        for line in skipped:
            print(f"{what}: skipped {line}", flush=True)
        if chosen is not None:
            print(f"{what}: using {os.path.join(ckpt_dir, chosen)}, the newest checkpoint that verifies", flush=True)
    return chosen


def save(engine, ckpt_dir: str, step: int, client_state: Dict[str, Any], keep: int, tokenizer=None,
         meta: Optional[Dict[str, Any]] = None, before_commit: Optional[Callable[[str], None]] = None,
         rank_state: Optional[Dict[str, Any]] = None) -> str:
    """Save a checkpoint on every rank (collective); returns its tag. The tokenizer, if given, is
    saved beside the weights, so the step folder alone can be sampled from; `meta` (JSON-able) is
    what `check_resumable` compares against the next run; `rank_state`, this rank's own state (each
    rank passes its own), is what `load_rank_state` returns. `before_commit(step_dir)` runs on every
    rank once every file but COMPLETE and latest is written: what it raises leaves the checkpoint
    incomplete, as a kill at that moment would."""
    tag = step_tag(step)
    rank = dist.get_rank()
    step_dir = os.path.join(ckpt_dir, tag)
    failure, advice = None, None
    if rank == 0:
        try:
            _make_room(ckpt_dir, tag)
            failure = _short_of_space(ckpt_dir)
        except OSError as e:
            failure = f"clearing the earlier {step_dir} out of the way: {type(e).__name__}: {e}"
            advice = _make_room_advice(e, step_dir)
    _all_ranks_wrote(failure, step_dir, ckpt_dir, remove=False, advice=advice)
    ds.skip_recovery_scripts(engine)
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), os.path.join(step_dir, f"rng_rank{rank}.pt"))
        if rank_state is not None:
            torch.save(rank_state, os.path.join(step_dir, f"state_rank{rank}.pt"))
        if rank == 0:
            if tokenizer is not None:
                tokenizer.save(os.path.join(step_dir, TOKENIZER))
            atomic_write_text(os.path.join(step_dir, META), json.dumps(meta or {}, indent=1, sort_keys=True))
            # Before the manifest: a script inside the step folder would be listed in it.
            for folder in (ckpt_dir, step_dir):
                _remove_recovery_scripts(folder)
    except (OSError, RuntimeError) as e:  # C++ writers report a full disk as RuntimeError
        failure = f"{type(e).__name__}: {e}"
    _all_ranks_wrote(failure, step_dir, ckpt_dir)
    if before_commit is not None:
        before_commit(step_dir)
        # Rank 0 commits only once every rank's hook has run: a hook that raises on another rank
        # must leave the checkpoint incomplete there too.
        dist.barrier()
    # Each rank hashes its share of the files; rank 0 writes the manifest before COMPLETE.
    failure, mine = None, {}
    try:
        mine = manifest.digests(step_dir, (COMPLETE,), rank, dist.get_world_size())
    except OSError as e:
        failure = f"{type(e).__name__}: {e}"
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    if rank == 0 and failure is None:
        try:
            manifest.write_manifest(step_dir, {k: v for share in shares for k, v in share.items()})
        except OSError as e:
            failure = f"{type(e).__name__}: {e}"
    _all_ranks_wrote(failure, step_dir, ckpt_dir)
    if rank == 0:
        atomic_write_text(os.path.join(step_dir, COMPLETE), f"{step}\n")
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
        _prune(ckpt_dir, keep, tag)
    dist.barrier()
    return tag


def _make_room(ckpt_dir: str, tag: str) -> None:
    """Rank 0, before a save of `tag`: a folder of that tag left by a save that did not finish (no
    COMPLETE) is removed; anything else there (a complete folder, from a continuation a resume did
    not take: newer ones that fail to verify, or a copy) is set aside, never deleted."""
    path = os.path.join(ckpt_dir, tag)
    if not os.path.lexists(path):
        return
    folder = os.path.isdir(path) and not os.path.islink(path)
    if folder and _recorded_step(path) is None:
        shutil.rmtree(path)
        return
    what = ("a complete checkpoint of a continuation that --resume did not take (one that did not verify, or a "
            "copy)") if folder else "a symbolic link or a file"
    moved = _move_aside(ckpt_dir, tag, "superseded")
    print(f"checkpoint: {path} was {what}; set aside as {moved}, not overwritten", flush=True)


def _short_of_space(ckpt_dir: str) -> Optional[str]:
    """Rank 0, before a save: why the file system cannot hold another checkpoint as large as the
    newest complete one (None: it can, or there is none to measure by). A disk that fills in the
    middle of DeepSpeed's save fails one rank between collectives the others are waiting in, which
    only the hang bound ends; a disk already short of a checkpoint's size is found here, before
    any rank writes, and every rank stops with the previous checkpoint named."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    newest = os.path.join(ckpt_dir, tags[0])
    # lstat, regular files only: a link planted in the folder is measured as nothing, never followed.
    entries = (os.lstat(os.path.join(newest, name)) for name in os.listdir(newest))
    needed = sum(st.st_size for st in entries if stat.S_ISREG(st.st_mode))
    fs = os.statvfs(ckpt_dir)
    free = fs.f_bavail * fs.f_frsize
    if free >= needed:
        return None
    return (f"its file system has {free / 2**20:.1f} MiB free, less than the {needed / 2**20:.1f} MiB the newest "
            f"checkpoint {tags[0]} takes (nothing was written)")


def _make_room_advice(e: OSError, path: str) -> str:
    """What to do when `_make_room` could not move or remove what was at `path`."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"You may not move or remove {path}: give yourself write permission on it and its folder, or move "
                "it out of checkpoints/ yourself, and resume")
    if e.errno == errno.EROFS:
        return f"{os.path.dirname(path)} is on a read-only file system: point --out-dir at a writable one and resume"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"Free space on {os.path.dirname(path)}'s file system (or point --out-dir elsewhere) and resume"
    return f"Move {path} out of checkpoints/ yourself (a save sets a complete one aside, never deletes it) and resume"


def _remove_recovery_scripts(folder: str) -> None:
    """DeepSpeed's copies of its recovery scripts (runs before skip_recovery_scripts left them): they
    unpickle with weights_only=False. Only a regular file with DeepSpeed's header is removed."""
    for name in ds.RECOVERY_SCRIPTS:
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        head = b""
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                head = f.read(1024)
        if b"# DeepSpeed Team" in head:
            os.remove(path)
        else:
            _note_once(("script", os.path.realpath(path)), f"checkpoints: left {path} in place: not DeepSpeed's "
                       "copy of its script; launch/consolidate.py is the tool for these checkpoints")


def _prune(ckpt_dir: str, keep: int, newest: str) -> None:
    # The newest checkpoint's weights are not yet known to be healthy (the next step's loss tells);
    # the one before it is (every step since gave a healthy loss), so it stays until a newer one is.
    tags = complete_tags(ckpt_dir)
    healthy = next((t for t in tags if tag_step(t) < tag_step(newest)), None)
    for old in tags[keep:]:
        if old not in (newest, healthy):
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def tag_step(tag: str) -> int:
    return int(tag[len("step"):])


def _move_aside(ckpt_dir: str, tag: str, why: str) -> str:
    """Rename checkpoints/<tag> to a free `<why>_<tag>[.n]`; the new path."""
    target = os.path.join(ckpt_dir, f"{why}_{tag}")
    n = 1
    while os.path.lexists(target):
        n += 1
        target = os.path.join(ckpt_dir, f"{why}_{tag}.{n}")
    os.rename(os.path.join(ckpt_dir, tag), target)
    return target


def set_aside(ckpt_dir: str, tags: List[str], why: str) -> List[str]:
    """Rename step folders to `<why>_<tag>` (kept for inspection, no longer resumed or pruned)
    and point `latest` at the newest complete one left (or remove it). Rank 0 only; returns the
    new paths."""
    moved = [_move_aside(ckpt_dir, tag, why) for tag in tags]
    left = complete_tags(ckpt_dir)
    if left:
        atomic_write_text(os.path.join(ckpt_dir, LATEST), left[0])
    elif os.path.exists(os.path.join(ckpt_dir, LATEST)):
        os.remove(os.path.join(ckpt_dir, LATEST))
    return moved


def apply_schedule_position(engine) -> None:
    """Set the optimizer's learning rate to this run's schedule (its config, its --lr) at the
    position the schedule was restored to. DeepSpeed restores the saved rate with the optimizer's
    param groups and sets the schedule's only after the next step, so a resume with a lower --lr
    would otherwise take one step at the old rate; with the same schedule this rate is the same
    number. A schedule's load_state_dict restores its position only, so a reshard needs it too."""
    if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "last_batch_iteration"):
        engine.lr_scheduler.step(engine.lr_scheduler.last_batch_iteration)


def _differences(saved, expected, path: str = "") -> List[str]:
    """'field: saved -> expected' for every leaf where two JSON-like values differ."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        return [d for key in sorted(set(saved) | set(expected))
                for d in _differences(saved.get(key), expected.get(key), f"{path}.{key}" if path else key)]
    return [] if saved == expected else [f"{path}: {saved!r} -> {expected!r}"]


def _resume_view(meta: Dict[str, Any]) -> Dict[str, Any]:
    """What a resume must match: the model config without its implementation-only fields."""
    if "model_config" not in meta:
        return meta
    return {**meta, "model_config": without_implementation_fields(model_config_from_dict(meta["model_config"]))}


LAYOUT_KEYS = ("world_size", "ep_size", "expert_ranks")
"""meta.json's record of the layout: a resume on another layout may change them."""


def read_meta(step_dir: str) -> Dict[str, Any]:
    """A step folder's meta.json in the current format."""
    return read_meta_file(step_dir, f"--resume: checkpoint {step_dir}")


def verified_step(ckpt_dir: str, step: int, what: str) -> str:
    """The tag of step `step`'s checkpoint, once it is complete and matches its manifest."""
    tag = step_tag(step)
    tags = complete_tags(ckpt_dir)
    if tag not in tags:
        have = ", ".join(str(tag_step(t)) for t in reversed(tags)) or "none"
        raise ConfigError(f"{what}: {ckpt_dir} holds no complete checkpoint of step {step} (complete steps: {have}); "
                          "name one of those, or resume the newest with --resume alone")
    found = _problems_on_all_ranks(os.path.join(ckpt_dir, tag))
    if found:
        raise manifest.CorruptCheckpointError(f"{what}: {os.path.join(ckpt_dir, tag)}: {found[0]}; restore the file "
                                              "or name another step")
    return tag


def _describe_tokenizer(identity) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    return (f"a {identity.get('kind', '?')} tokenizer of {identity.get('vocab_size', '?')} tokens built from "
            f"{identity.get('built_from', '?')} (sha256 {str(identity.get('sha256', '?'))[:12]})")


def _other_data(where: str, saved, expected) -> str:
    return (f"--resume: checkpoint {where} was trained on other data or another tokenizer: it has "
            f"{_describe_tokenizer(saved)}, this run's data gives {_describe_tokenizer(expected)}. Resume with "
            f"the checkpoint's corpus (the same --dataset/--path) and tokenizer (--tokenizer "
            f"{os.path.join(where, TOKENIZER)}), or train on this corpus in a new --out-dir")


def check_resumable(ckpt_dir: str, expect: Dict[str, Any], relayout_refusal: Optional[str] = None,
                    step: Optional[int] = None) -> Optional[str]:
    """The tag to resume from, after checking that the checkpoint's meta.json matches `expect`
    (model config, tokenizer, ...; world_size and ep_size too unless the run may change layout:
    `relayout_refusal` None). Reads only small files, so every rank can call it before any compute;
    a mismatch is refused with the reason. None: no checkpoint yet. `step`: that step's checkpoint
    instead of the newest that verifies. Checkpoints of an earlier format are compared as this
    version would have written them."""
    tag = newest_verified(ckpt_dir) if step is None else verified_step(ckpt_dir, step, "train.resume_step")
    if tag is None:
        return None
    where = os.path.join(ckpt_dir, tag)
    saved = _resume_view(json.loads(json.dumps(read_meta(where))))
    expect = json.loads(json.dumps(_resume_view(expect)))  # tuples and lists compare as JSON would store them
    if "tokenizer" in expect and saved.get("tokenizer") != expect["tokenizer"]:
        # Before the model config, whose vocab_size follows from the tokenizer.
        raise ConfigError(_other_data(where, saved.get("tokenizer"), expect["tokenizer"]))
    for key, value in expect.items():
        if key in LAYOUT_KEYS and (relayout_refusal is None or key not in ("world_size", "ep_size")):
            continue
        if saved.get(key) != value:
            if key == "model_config":
                why = (f"another model config ({'; '.join(_differences(saved.get(key), value))}); a resume "
                       "continues the same model")
            else:
                why = f"{key}={saved.get(key)!r}, this run has {key}={value!r}, and {relayout_refusal}"
            raise ConfigError(f"--resume: checkpoint {where} was written with {why}; resume with the same world size, "
                              "ep_size and model, or evaluate and sample the checkpoint (launch/evaluate.py, "
                              "launch/generate.py), which take any layout")
    return tag


def load(engine, ckpt_dir: str, tag: str) -> Dict[str, Any]:
    """Load checkpoint `tag` into `engine` (collective) and restore this rank's RNG states."""
    # Every rank checks every file's pickle first, so that an unsafe file stops all ranks alike,
    # before any of them waits in a collective; DeepSpeed's own reads then load weights-only too.
    check_step_folder(os.path.join(ckpt_dir, tag))
    ds.set_checkpoint_loader(engine, lambda path, map_location=None: load_file(path, map_location))
    load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if load_path is None:
        raise ConfigError(f"--resume: DeepSpeed could not load {os.path.join(ckpt_dir, tag)}")
    apply_schedule_position(engine)
    _set_rng_state(load_file(os.path.join(ckpt_dir, tag, f"rng_rank{dist.get_rank()}.pt")))
    return client_state


def load_rank_state(ckpt_dir: str, tag: str) -> Dict[str, Any]:
    """This rank's own task state saved with checkpoint `tag` (see save's rank_state)."""
    path = os.path.join(ckpt_dir, tag, f"state_rank{dist.get_rank()}.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: {path} is missing; this run's task keeps per-rank state (a backbone's "
                          "memory) that the checkpoint lacks: resume it with the model that wrote it")
    return load_file(path)
