"""Where consolidate may write, and what it may replace: never into a checkpoint (a step folder, a
checkpoints/ folder, the input's checkpoint tree), never over a file or folder it did not write
unless told (--force, for a file). Checked before any weight is read, and again before the rename.

Its own files are known without loading them: a .pt it writes starts with the entry
('format', PT_FORMAT), read with pickletools (opcodes only: nothing is unpickled); a Hugging Face
export holds a config.json of model_type HF_MODEL_TYPE."""

import json
import os
import pickletools
import zipfile
from typing import Any, Dict, Iterator

import torch

from ..config import ConfigError
from ..fileio import atomic_write
from ..parallel.deepspeed_internals import MODEL_STATES
from .manifest import MANIFEST
from .store import COMPLETE, LATEST, SET_ASIDE, step_of_name

PT_FORMAT = "s2moe_ds consolidated model (fp32)"
"""The first entry ('format') of the file --format pt writes: how a rerun knows the file as its own."""
HF_MODEL_TYPE = "s2moe"
"""config.json's model_type in our Hugging Face export (hf.modeling.S2MoEConfig.model_type)."""


def _names_a_step(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            return step_of_name(f.read(64).strip()) is not None
    except OSError:
        return False


def _is_checkpoint_folder(folder: str) -> bool:
    """A step folder (or a set-aside one), or a checkpoints/ folder: one holding step folders or a
    `latest` that names one."""
    if not os.path.isdir(folder):
        return False
    name = os.path.basename(folder)
    if step_of_name(name) is not None or name.startswith(tuple(f"{w}_step" for w in SET_ASIDE)):
        return True
    if os.path.isfile(os.path.join(folder, MODEL_STATES)) or (
            os.path.isfile(os.path.join(folder, MANIFEST)) and os.path.isfile(os.path.join(folder, COMPLETE))):
        return True
    try:
        entries = os.listdir(folder)
    except OSError:  # a folder we may not list holds no checkpoint of ours
        return False
    return _names_a_step(os.path.join(folder, LATEST)) or any(
        step_of_name(d) is not None and os.path.isdir(os.path.join(folder, d)) for d in entries)


def _folders_above(path: str) -> Iterator[str]:
    folder = os.path.dirname(path)
    while True:
        yield folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


def _real_out(out: str) -> str:
    # The output's folder with links resolved, the name itself not: a link named --out is replaced.
    path = os.path.abspath(out.rstrip(os.sep) or out)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _checkpoint_roots(checkpoint: str) -> Iterator[str]:
    """The checkpoint tree the input names: its checkpoints/ folder, or the folder itself."""
    real = os.path.realpath(checkpoint)
    if os.path.isdir(os.path.join(real, "checkpoints")):
        yield os.path.join(real, "checkpoints")
    if os.path.isfile(os.path.join(real, MODEL_STATES)):
        yield os.path.dirname(real) if _is_checkpoint_folder(os.path.dirname(real)) else real
    elif _is_checkpoint_folder(real):
        yield real


def _check_not_in_checkpoint(out: str, checkpoint: str) -> None:
    path = _real_out(out)
    inside = [f for f in (path, *_folders_above(path)) if _is_checkpoint_folder(f)]
    inside += [r for r in _checkpoint_roots(checkpoint) if path == r or path.startswith(r.rstrip(os.sep) + os.sep)]
    if inside:
        raise ConfigError(f"--out: {out} is inside the checkpoint folder {inside[0]}; consolidate never writes into "
                          "checkpoints (a file there would fail the step's manifest or replace its own files): name "
                          "a path outside checkpoints/, e.g. in the run folder")


def _written_by_consolidate(path: str) -> bool:
    """Whether `path` is a file --format pt wrote: its pickle's first two strings are 'format' and
    PT_FORMAT. pickletools reads the opcodes only: nothing in the file is unpickled or run."""
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if name is None:
                return False
            with archive.open(name) as f:
                head = f.read(512)
    except (OSError, zipfile.BadZipFile):
        return False
    strings = []
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if "UNICODE" in opcode.name:
                strings.append(arg)
                if len(strings) == 2:
                    break
    except ValueError:  # the head ends inside an opcode
        pass
    return strings == ["format", PT_FORMAT]


def _check_pt_out(out: str, force: bool) -> None:
    if os.path.isdir(out):
        raise ConfigError(f"--out: {out} is a folder; --format pt writes one file: name a file, e.g. "
                          f"{os.path.join(out, 'model_fp32.pt')}")
    if os.path.lexists(out) and not force and not _written_by_consolidate(out):
        what = "a symbolic link" if os.path.islink(out) else "a file consolidate did not write"
        raise ConfigError(f"--out: {out} exists and is {what} (a file it wrote before its files carried a "
                          "format entry counts too); pass --force to replace it (a link is replaced, not its "
                          "target), or name a new file")


def check_export_folder(out_dir: str, model_type: str = HF_MODEL_TYPE) -> None:
    """Replace only an earlier export of ours (or an empty folder, or nothing): never a folder of
    something else, a file or a symbolic link."""
    if os.path.islink(out_dir.rstrip(os.sep) or out_dir):
        raise ConfigError(f"--out: {out_dir} is a symbolic link; --format hf replaces the folder it names, so name "
                          "the folder itself")
    if os.path.isfile(out_dir):
        raise ConfigError(f"--out: {out_dir} is a file; --format hf writes a folder, name a new one")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        try:
            with open(os.path.join(out_dir, "config.json")) as f:
                earlier = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != model_type:
            raise ConfigError(f"--out: {out_dir} is a non-empty folder that holds no earlier export of ours; "
                              "name a new or empty folder")


def check_output(out: str, checkpoint: str, fmt: str, force: bool = False) -> None:
    """Everything about consolidate's --out (a .pt file, or with fmt 'hf' a folder) that refuses
    it, before any checkpoint is read; ConfigError naming the fix."""
    _check_not_in_checkpoint(out, checkpoint)
    folder = os.path.dirname(os.path.abspath(out.rstrip(os.sep) or out))
    if not os.path.isdir(folder):
        raise ConfigError(f"--out: folder {folder} does not exist; create it first (mkdir -p) or name one in an "
                          "existing folder")
    if fmt == "hf":
        check_export_folder(out)
    else:
        _check_pt_out(out, force)


def write_consolidated(out: str, checkpoint: str, force: bool, state: Dict[str, torch.Tensor],
                       model_config: Dict[str, Any], tokenizer) -> None:
    """Write --format pt's file atomically (a temporary file of ours beside it, then a rename),
    after checking --out again: a file may have appeared there while the weights were read."""
    check_output(out, checkpoint, "pt", force)
    blob = {"format": PT_FORMAT, "state_dict": state, "model_config": model_config, "tokenizer": tokenizer}
    atomic_write(out, lambda f: torch.save(blob, f))
