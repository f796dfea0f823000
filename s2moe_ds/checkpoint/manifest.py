"""Each checkpoint's manifest: the size and SHA-256 of every file of its step folder, written
before COMPLETE, so that a truncated, missing, altered or added file is found, and named, before
anything reads it. The ranks hash their shares of the files in parallel. Step folders written
before manifests existed have none and are not verified.

A manifest detects damage, not tampering: whoever can rewrite a file can rewrite the manifest too
(safe_load.py is what keeps a crafted file from running code). It is strict all the same, so that
it cannot be satisfied by accident: it lists exactly the folder's regular files but COMPLETE and
itself, by base name, with a non-negative integer size and a 64-hex-digit SHA-256 each; a folder
entry that is no regular file (a symlink, a FIFO, a subfolder) is refused."""

import hashlib
import json
import os
import re
import stat
from typing import Dict, List, Sequence

from ..config import ConfigError
from ..fileio import atomic_write_text

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
UNLISTED = (COMPLETE, MANIFEST)
"""The step folder's files the manifest does not list: COMPLETE is written after it."""
_CHUNK = 1 << 22
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _kind(path: str) -> str:
    """'' for a regular file (not followed through a symlink), else what the entry is."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode):
        return ""
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(where: str, kind: str) -> str:
    return (f"{where}: {kind}, not a regular file; a step folder holds only the regular files a save writes "
            "(a link could point anywhere): remove it, or copy the real file in its place")


def _files(step_dir: str, exclude: Sequence[str]) -> List[str]:
    """The folder's files to list; OSError for an entry that is no regular file (a save that lists
    it could never verify)."""
    names = []
    for name in sorted(os.listdir(step_dir)):
        if name in exclude or name in UNLISTED:
            continue
        kind = _kind(os.path.join(step_dir, name))
        if kind:
            raise OSError(_not_regular(os.path.join(step_dir, name), kind))
        names.append(name)
    return names


def digests(step_dir: str, exclude: Sequence[str], rank: int = 0, world: int = 1) -> Dict[str, Dict[str, object]]:
    """This rank's share (every world-th file) of the folder's files and their digests."""
    return {name: file_digest(os.path.join(step_dir, name)) for name in _files(step_dir, exclude)[rank::world]}


def write_manifest(step_dir: str, entries: Dict[str, Dict[str, object]]) -> None:
    atomic_write_text(os.path.join(step_dir, MANIFEST), json.dumps({"files": entries}, indent=1, sort_keys=True))


def _bad_name(name) -> str:
    """Why `name` cannot be a manifest entry ('' when it can): only a plain base name of the folder."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name) \
            or os.path.basename(name) != name:
        return "is not a plain file name of the step folder (a path, '..' or absolute)"
    if name in UNLISTED:
        return f"is never listed ({COMPLETE} is written after the manifest, which cannot hash itself)"
    return ""


def _bad_entry(entry) -> str:
    if not isinstance(entry, dict):
        return f"is {type(entry).__name__}, not an object with 'size' and 'sha256'"
    size, digest = entry.get("size"), entry.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"has size {size!r}, not a non-negative integer"
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        return f"has sha256 {digest!r}, not 64 lowercase hexadecimal digits"
    return ""


def read_manifest(step_dir: str) -> Dict[str, Dict[str, object]]:
    """The manifest's files, every name and entry checked; CorruptCheckpointError naming what is wrong."""
    path = os.path.join(step_dir, MANIFEST)

    def refuse(why: str):
        return CorruptCheckpointError(f"{path}: {why}; the manifest is not as s2moe-ds writes it (damaged or "
                                      "edited)")
    kind = _kind(path)
    if kind:
        raise refuse(f"{kind}, not a regular file")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise refuse(f"not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise refuse(f"unreadable ({e.strerror or e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("files"), dict):
        raise refuse("no object 'files' (name: size and SHA-256)")
    files = obj["files"]
    if not files:
        raise refuse("'files' lists no file, so it would verify anything")
    for name, entry in sorted(files.items()):
        why = _bad_name(name) or _bad_entry(entry)
        if why:
            raise refuse(f"entry {name!r} {why}")
    return files


def _listing_problems(step_dir: str, files: Dict[str, Dict[str, object]]) -> List[str]:
    """Entries of the folder that are no regular file, and regular files the manifest does not list."""
    found = []
    for name in sorted(os.listdir(step_dir)):
        where = os.path.join(step_dir, name)
        kind = _kind(where)
        if kind:
            found.append(_not_regular(where, kind))
        elif name not in files and name not in UNLISTED:
            found.append(f"{where}: not in the manifest (a file added after the save, or the manifest lost an "
                         "entry): remove the file if it does not belong")
    return found


def _file_problem(step_dir: str, name: str, want: Dict[str, object]) -> str:
    where = os.path.join(step_dir, name)
    if not os.path.lexists(where):
        return f"{where}: missing (the manifest lists it)"
    kind = _kind(where)
    if kind:
        return _not_regular(where, kind)
    size = os.path.getsize(where)
    if size != want["size"]:
        return f"{where}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
    if file_digest(where)["sha256"] != want["sha256"]:
        return f"{where}: its SHA-256 differs from the manifest's (the file was altered or corrupted)"
    return ""


def problems(step_dir: str, rank: int = 0, world: int = 1) -> List[str]:
    """What is wrong with the folder (rank 0: the manifest and the folder's listing) and with this
    rank's share of the manifest's files ([] when all match, or when the folder predates manifests)."""
    if not os.path.lexists(os.path.join(step_dir, MANIFEST)):
        return []
    try:
        files = read_manifest(step_dir)
    except CorruptCheckpointError as e:
        return [str(e)] if rank == 0 else []
    found = _listing_problems(step_dir, files) if rank == 0 else []
    for name in sorted(files)[rank::world]:
        try:
            problem = _file_problem(step_dir, name, files[name])
        except OSError as e:  # unreadable (permissions, an I/O error)
            problem = f"{os.path.join(step_dir, name)}: unreadable ({e.strerror or e})"
        if problem and problem not in found:  # a link is both unlisted-kind and a listed file's problem
            found.append(problem)
    return found


_verified = set()
"""Step folders this process saw verified (with every rank's share), as they were then."""


def _state(step_dir: str):
    """The folder as it is now: its entries' names, kinds, sizes and modification times."""
    entries = []
    for name in sorted(os.listdir(step_dir)):
        st = os.lstat(os.path.join(step_dir, name))
        entries.append((name, st.st_mode, st.st_size, st.st_mtime_ns))
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
