"""Writes that a kill cannot leave half done: a reader sees the old file or the new one, never a torn one.

The temporary file is created by `tempfile.mkstemp` beside the target (O_EXCL, an unpredictable
name): a symbolic link planted under a guessable temporary name cannot make a write land on its
target, and two writers never share one."""

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterator, Tuple


def _read_umask() -> int:
    # Once, at import (before any thread starts): os.umask can only be read by setting it.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
TMP_SUFFIX = ".tmp"
"""Our temporary names: '.<target name>.<random>.tmp' in the target's folder."""


def temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


@contextlib.contextmanager
def temp_beside(path: str) -> Iterator[Tuple[BinaryIO, str]]:
    """(binary file, its name): a new file of ours in `path`'s folder, with the mode a plain open
    would give (mkstemp's is 0600). Removed if the block raises; else the caller renames it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            yield f, tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # ours: mkstemp created it
        raise


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temporary file beside `path`, flushed to disk, then renamed over `path`
    (a symbolic link at `path` is replaced, never followed)."""
    with temp_beside(path) as (f, tmp):
        write(f)
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def new_folder_beside(path: str, what: str) -> str:
    """A new empty folder of ours ('.<name>.<random>.<what>') beside `path`, with the mode
    os.makedirs would give (mkdtemp's is 0700)."""
    parent = os.path.dirname(os.path.abspath(path.rstrip(os.sep)))
    folder = tempfile.mkdtemp(dir=parent, prefix=temp_prefix(path.rstrip(os.sep)), suffix=f".{what}")
    os.chmod(folder, 0o777 & ~_UMASK)
    return folder
