"""Each checkpoint's manifest: the size and SHA-256 of every file of its step folder, written
before COMPLETE, so that a truncated, missing or altered file is found, and named, before anything
reads it. The ranks hash their shares of the files in parallel. Step folders written before
manifests existed have none and are not verified."""

import hashlib
import json
import os
from typing import Dict, List, Sequence

from ..config import ConfigError
from ..fileio import atomic_write_text

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 22


class CorruptCheckpointError(ConfigError):
    """A step folder whose files do not match its manifest."""


def file_digest(path: str) -> Dict[str, object]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def _files(step_dir: str, exclude: Sequence[str]) -> List[str]:
    return sorted(n for n in os.listdir(step_dir) if n not in exclude and n != MANIFEST
                  and os.path.isfile(os.path.join(step_dir, n)))


def digests(step_dir: str, exclude: Sequence[str], rank: int = 0, world: int = 1) -> Dict[str, Dict[str, object]]:
    """This rank's share (every world-th file) of the folder's files and their digests."""
    return {name: file_digest(os.path.join(step_dir, name)) for name in _files(step_dir, exclude)[rank::world]}


def write_manifest(step_dir: str, entries: Dict[str, Dict[str, object]]) -> None:
    atomic_write_text(os.path.join(step_dir, MANIFEST), json.dumps({"files": entries}, indent=1, sort_keys=True))


def problems(step_dir: str, rank: int = 0, world: int = 1) -> List[str]:
    """What is wrong with this rank's share of the manifest's files ([] when they match, or when
    the folder predates manifests)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        names = sorted(files)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{path}: unreadable manifest ({e})"] if rank == 0 else []
    found = []
    for name in names[rank::world]:
        where = os.path.join(step_dir, name)
        want = files[name]
        if not os.path.isfile(where):
            found.append(f"{where}: missing (the manifest lists it)")
            continue
        size = os.path.getsize(where)
        if size != want["size"]:
            found.append(f"{where}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif file_digest(where)["sha256"] != want["sha256"]:
            found.append(f"{where}: its SHA-256 differs from the manifest's (the file was altered or corrupted)")
    return found


_verified = set()
"""Step folders this process saw verified (with every rank's share), as they were then."""


def _state(step_dir: str):
    """The folder as it is now: its files' names, sizes and modification times."""
    entries = []
    for name in sorted(os.listdir(step_dir)):
        st = os.stat(os.path.join(step_dir, name))
        entries.append((name, st.st_size, st.st_mtime_ns))
    return os.path.realpath(step_dir), tuple(entries)


def remember_verified(step_dir: str) -> None:
    """Every file of the folder matched (all ranks' shares together): a later `verify` of the
    unchanged folder in this process (a resume that consolidates, a reshard) need not hash it again."""
    _verified.add(_state(step_dir))


def verify(step_dir: str) -> None:
    """Raise CorruptCheckpointError naming the first bad file of the step folder (one process)."""
    if _state(step_dir) in _verified:
        return
    found = problems(step_dir)
    if not found:
        remember_verified(step_dir)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CorruptCheckpointError(f"checkpoint {step_dir} is damaged: {found[0]}{more}; use an earlier step "
                                     "folder of the run (--tag for evaluate and consolidate), or restore the file")
