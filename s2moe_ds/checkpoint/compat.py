"""Checkpoints written before the current format: what changed, and how they are read.

Format 1 (before the redesign of issue 11; no `format_version` key): the model config named the
block kind in `moe.router` ('s2moe', 'smoe', 'dense'), held `moe.ep_size`, the S2MoE settings in
`moe.s2moe` and DeepSpeed's gate settings in `moe`. Its module tree and state-dict keys are those
of format 2, so its weights, optimizer states and data position load unchanged; only the config
is rewritten, into the config this code would have written for the same model.

Format 2: `moe.block`, `moe.router`, `moe.block_config`, `moe.router_config`; the parallel
layout apart (`ep_size` in the checkpoint's meta, never in the model config).
"""

import json
import os
import stat
from typing import Any, Dict, Sequence

from ..config import ConfigError

FORMAT_VERSION = 2

_TOPK_FIELDS_V1 = ("noisy_gate_policy", "use_rts", "top2_2nd_expert_sampling")


def format_version(state: Dict[str, Any]) -> int:
    return int(state.get("format_version", 1))


_POSITIVE_INTS = ("format_version", "world_size", "ep_size", "global_batch")
_OBJECTS = ("model_config", "tokenizer")
META_KEYS = ("model_config", "tokenizer", "world_size", "ep_size")
"""What every meta.json of a training run holds, in every format."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(meta: Dict[str, Any]) -> str:
    """Why the known keys of `meta` do not have the types s2moe-ds writes ('' when they do)."""
    for key in _POSITIVE_INTS:
        if key in meta and not (_is_int(meta[key]) and meta[key] >= 1):
            return f"{key!r} is {meta[key]!r}, not a positive integer"
    for key in _OBJECTS:
        if key in meta and not isinstance(meta[key], dict):
            return f"{key!r} is {type(meta[key]).__name__}, not an object"
    tokenizer = meta.get("tokenizer")
    if isinstance(tokenizer, dict):
        for key, kind, name in (("kind", str, "a string"), ("sha256", str, "a string"), ("vocab_size", int, "an integer")):
            if key in tokenizer and not (isinstance(tokenizer[key], kind) and not isinstance(tokenizer[key], bool)):
                return f"'tokenizer.{key}' is {tokenizer[key]!r}, not {name}"
    if "expert_ranks" in meta and not isinstance(meta["expert_ranks"], list):
        return f"'expert_ranks' is {type(meta['expert_ranks']).__name__}, not a list"
    return ""


_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _read_regular_file(path: str, where: str) -> bytes:
    """The bytes of `path` if it is a regular file (not through a link); ConfigError naming what
    it is otherwise, before an open that could wait for ever (a FIFO with no writer, a device)."""
    def refuse(mode: int) -> ConfigError:
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        return ConfigError(f"{where}: {path} is {kind}, not a regular file; a step folder's meta.json is the "
                           "regular file a save wrote: put that file in its place (from a copy of the run), or "
                           "use another step folder")
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    # Non-blocking and not through a link: the entry could be swapped after the lstat.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        return f.read()


def read_meta_file(step_dir: str, where: str, required: Sequence[str] = META_KEYS) -> Dict[str, Any]:
    """A step folder's meta.json in the current format: JSON, an object, `required` keys present
    and every known key of the type s2moe-ds writes; ConfigError naming the file otherwise."""
    path = os.path.join(step_dir, "meta.json")
    fix = "the file was edited or damaged: restore it from a copy of the run, or use another step folder"
    try:
        data = _read_regular_file(path, where)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} is missing; {fix}") from None
    except OSError as e:
        raise ConfigError(f"{where}: {path} is unreadable ({e.strerror or e}); fix its permissions") from None
    try:
        meta = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: {path} is not JSON ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: {path} holds {type(meta).__name__}, not an object; {fix}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ConfigError(f"{where}: {path} has no {', '.join(map(repr, missing))}; {fix}")
    return upgrade_meta(meta, f"{where} ({path})")


def upgrade_model_config(model_config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A model config dict of any known format as format 2 writes it (every field present)."""
    from ..models import model_config_from_dict
    from ..moe import BLOCKS
    from ..moe.config import BLOCK_OF_OLD_ROUTER
    if not isinstance(model_config, dict) or not isinstance(model_config.get("moe") or {}, dict):
        raise ConfigError(f"{where}: its model config (or its 'moe') is not an object; the checkpoint is damaged "
                          "or was edited: restore it from a copy of the run")
    cfg = dict(model_config)
    moe = dict(cfg.get("moe") or {})
    if "block" not in moe:
        router = moe.pop("router", "s2moe")
        if router not in BLOCK_OF_OLD_ROUTER:
            raise ConfigError(f"{where}: its model config names router {router!r}, which no version of s2moe-ds "
                              "wrote; the checkpoint is not one of ours or is damaged")
        moe.pop("ep_size", None)
        block = BLOCK_OF_OLD_ROUTER[router]
        # Format 1 carried S2MoE's settings for every router; only the kind that has settings keeps them.
        s2moe = moe.pop("s2moe", None)
        router_config = {name: moe.pop(name) for name in _TOPK_FIELDS_V1 if name in moe}
        moe.update(block=block, router="topk", router_config=router_config,
                   block_config=s2moe if BLOCKS[block].config is not None else None)
        cfg["moe"] = moe
    try:
        return model_config_from_dict(cfg).to_dict()
    except (ConfigError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConfigError(f"{where}: its model config cannot be read by this version ({e}); evaluate or resume it "
                          "with the version that wrote it") from None


def upgrade_meta(meta: Dict[str, Any], where: str) -> Dict[str, Any]:
    """meta.json (or the client state's same keys) in format 2."""
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: its meta data is {type(meta).__name__}, not an object; the checkpoint is "
                          "damaged or not one of ours: restore it from a copy, or use another step folder")
    why = _type_problem(meta)
    if why:
        raise ConfigError(f"{where}: its meta data's {why}; the file was edited or damaged: restore it from a copy "
                          "of the run, or use another step folder")
    version = format_version(meta)
    if version > FORMAT_VERSION:
        raise ConfigError(f"{where}: written in checkpoint format {version} by a newer s2moe-ds; this version reads "
                          f"formats up to {FORMAT_VERSION}, so upgrade s2moe-ds to use it")
    out = dict(meta, format_version=FORMAT_VERSION)
    if "model_config" in out:
        out["model_config"] = upgrade_model_config(out["model_config"], where)
    return out
