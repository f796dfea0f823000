"""Reading checkpoint files without running their code: every read is a weights-only unpickling
that may rebuild tensors, plain containers and an explicit allowlist of classes (DeepSpeed's
optimizer-state records, numpy's arrays for RNG files of earlier versions), nothing else.

A file that asks for anything more (a pickled function call, another class) is refused with an
UnsafeCheckpointError naming the file and what it asked for, before the rest of the file is read.
"""

import os
import pickle
import re
import stat
import zipfile
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.torch_version import TorchVersion

from ..config import ConfigError
from ..parallel import deepspeed_internals as ds


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file would need more than weights-only unpickling: it is not read."""


def allowed_globals() -> List[type]:
    """Everything besides tensors and plain containers that our checkpoint files may hold."""
    numpy_globals = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        numpy_globals.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        numpy_globals.append(np.core.multiarray._reconstruct)
    return [*ds.checkpoint_globals(), *numpy_globals]


def _refuse(path: str, asked: Sequence[str]) -> UnsafeCheckpointError:
    """The one refusal every entry point gives (resume, evaluate, consolidate, generate, finetune)."""
    what = ", ".join(asked) if asked else "a global outside the allowlist"
    return UnsafeCheckpointError(
        f"checkpoint file {path}: refused to unpickle it: its pickle asks for {what}, which a checkpoint of ours never "
        "holds (weights, optimizer states, RNG states, configs); opening it could run its code. Use a checkpoint "
        "written by s2moe_ds, or one whose origin you trust re-saved as plain tensors")


def _unreadable(path: str, error: BaseException) -> ConfigError:
    first = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    why = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return ConfigError(f"checkpoint file {path}: cannot be read ({why}); it is truncated, damaged or no torch "
                       "file: restore it from a copy, or use an earlier step folder of the run")


def _damaged_file(error: RuntimeError) -> bool:
    """torch's own words for a file that is no (whole) torch file, or whose tensors claim more
    bytes than it stores (read whole: 'record size'; memory-mapped: 'not resizable')."""
    return any(w in str(error) for w in ("PytorchStreamReader", "zip archive", "torch.save", "corrupted",
                                         "does not match expected size", "not resizable"))


def _forbidden(path: str) -> List[str]:
    """The globals the file's pickle names outside the allowlist (reads the pickle only)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed)


def _regular_file(path: str) -> None:
    """A checkpoint file must be a regular file: opening a FIFO or a device would block or read for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(f"checkpoint file {path}: missing; the checkpoint is incomplete or was moved") from None
    except OSError as e:
        raise ConfigError(f"checkpoint file {path}: unreadable ({e.strerror or e}); fix its permissions") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(f"checkpoint file {path}: not a regular file (a FIFO, device or folder); put the "
                          "checkpoint's real file there")


SAFE_TORCH = "2.10"
"""The oldest torch whose weights-only unpickler has no published bypass (CVE-2025-32434: up to
2.5.1; CVE-2026-24747: before 2.10); setup.py requires it too."""


def check_torch_version() -> None:
    """Refuse to open any checkpoint file on an older torch: there, a crafted file gets past
    weights_only=True and runs its code, whatever our allowlist says. A pre-release of 2.10 counts
    as older, as it does for pip."""
    found = TorchVersion(torch.__version__)
    if found < SAFE_TORCH:
        raise UnsafeCheckpointError(
            f"torch {found}: checkpoint files are not opened with torch older than {SAFE_TORCH}, whose weights-only "
            "unpickler has published bypasses (CVE-2025-32434 up to 2.5.1, CVE-2026-24747 before 2.10) that let a "
            f"crafted file run its code; upgrade torch: pip install 'torch>={SAFE_TORCH}'")


def check_file(path: str) -> None:
    """Refuse `path` if its pickle names a global outside the allowlist (reads only the pickle,
    not the tensor data), so that every rank can check every file before any rank loads one."""
    check_torch_version()
    _regular_file(path)
    try:
        unknown = _forbidden(path)
    except (RuntimeError, pickle.UnpicklingError, ValueError, EOFError, OSError) as e:
        raise _unreadable(path, e) from None
    if unknown:
        raise _refuse(path, unknown)


def _asked_in(message: str) -> List[str]:
    """The globals torch's refusal names ("Unsupported global: GLOBAL posix.system ...")."""
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def load_file(path: str, map_location: Optional[object] = "cpu", mmap: bool = False):
    """torch.load with weights_only=True and our allowlist; UnsafeCheckpointError otherwise.
    `mmap`: the tensors map the file and are read only where touched (a file in torch's older
    non-zip format is read whole)."""
    check_torch_version()
    _regular_file(path)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        try:
            asked = _forbidden(path)
        except Exception:  # noqa: BLE001 - the refusal stands; only its detail is lost
            asked = []
        raise _refuse(path, asked or _asked_in(str(e))) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, RuntimeError) and not _damaged_file(e):
            raise  # e.g. a device the tensors cannot go to: not the file's fault
        raise _unreadable(path, e) from None


def check_step_folder(step_dir: str) -> None:
    """check_file on every torch file of a step folder."""
    for name in sorted(os.listdir(step_dir)):
        if name.endswith(".pt"):
            check_file(os.path.join(step_dir, name))
