"""Where consolidate may write, and what it may replace: never into a checkpoint (a step folder, a
checkpoints/ folder, the input's checkpoint tree), never over a file or folder it did not write
unless told (--force, for a file). Checked before any weight is read, and again before the rename.

Its own files are known without loading them: a .pt it writes starts with the entry
('format', PT_FORMAT), read with pickletools (opcodes only: nothing is unpickled); a Hugging Face
export holds a config.json of model_type HF_MODEL_TYPE."""

import json
import os
import pickletools
import re
import stat
import zipfile
from typing import Any, Dict, Iterator, List, Optional

import torch

from ..config import ConfigError
from ..data.config import check_output_folder
from ..fileio import atomic_write
from ..parallel.deepspeed_internals import MODEL_STATES
from .manifest import MANIFEST
from .store import COMPLETE, LATEST, SET_ASIDE, step_of_name

PT_FORMAT = "s2moe_ds consolidated model (fp32)"
"""The first entry ('format') of the file --format pt writes: how a rerun knows the file as its own."""
HF_MODEL_TYPE = "s2moe"
"""config.json's model_type in our Hugging Face export (hf.modeling.S2MoEConfig.model_type)."""
HF_REMOTE_CODE_FILES = ("configuration_s2moe.py", "modeling_s2moe.py", "tokenization_s2moe.py")
"""The trust_remote_code shims the export writes with --remote-code-shims (hf.export.REMOTE_CODE)."""
HF_EXPORT_FILES = frozenset((
    "model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "s2moe_tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", *HF_REMOTE_CODE_FILES))
"""Every name our Hugging Face export may hold (model and tokenizer files as Transformers 4 and 5 save
them, the shims): a folder holding anything else is not replaced, so nothing of the user's is lost."""
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
LM_EVAL_TASKS_SUFFIX = "-lm_eval_tasks"
"""The lm-evaluation-harness task folder is written beside the export (<out>-lm_eval_tasks), never
inside it: a task folder is run by lm_eval (its YAML may name Python), so it must be one the user
wrote, not one that came with an export."""
LM_EVAL_TASK_FILE = "s2moe_text.yaml"
_LEGACY_TASKS = "lm_eval_tasks"  # inside exports written before the task folder moved beside them


def _names_a_step(path: str) -> bool:
    # Only a regular file is read: a FIFO or device named `latest` above --out would block the open.
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
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


def checkpoint_folder_holding(out: str, checkpoint: str) -> Optional[str]:
    """The checkpoint folder (a step folder, a checkpoints/ folder, or the tree `checkpoint` names)
    that `out` lies in; None when it lies in none."""
    path = _real_out(out)
    inside = [f for f in (path, *_folders_above(path)) if _is_checkpoint_folder(f)]
    inside += [r for r in _checkpoint_roots(checkpoint) if path == r or path.startswith(r.rstrip(os.sep) + os.sep)]
    return inside[0] if inside else None


def _check_not_in_checkpoint(out: str, checkpoint: str) -> None:
    folder = checkpoint_folder_holding(out, checkpoint)
    if folder is not None:
        raise ConfigError(f"--out: {out} is inside the checkpoint folder {folder}; consolidate never writes into "
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


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _foreign_entries(folder: str) -> List[str]:
    """The entries of an earlier export's folder that no export of ours writes (or that are not
    plain files), sorted: what replacing the folder would delete of someone else's."""
    foreign = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in HF_EXPORT_FILES or _HF_SHARD.fullmatch(name):
            ok = _is_regular(path)
        elif name == _LEGACY_TASKS:
            ok = (not os.path.islink(path) and os.path.isdir(path)
                  and set(os.listdir(path)) <= {LM_EVAL_TASK_FILE}
                  and all(_is_regular(os.path.join(path, n)) for n in os.listdir(path)))
        else:
            ok = False
        if not ok:
            foreign.append(name)
    return foreign


def check_export_folder(out_dir: str, model_type: str = HF_MODEL_TYPE) -> None:
    """Replace only an earlier export of ours (or an empty folder, or nothing): never a folder of
    something else, a file or a symbolic link, nor an export someone added files to."""
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
        foreign = _foreign_entries(out_dir)
        if foreign:
            raise ConfigError(f"--out: {out_dir} holds an earlier export and also {', '.join(foreign[:5])}"
                              f"{' ...' if len(foreign) > 5 else ''} ({len(foreign)} entr"
                              f"{'y' if len(foreign) == 1 else 'ies'} no export of ours writes, e.g. lm_eval "
                              "results or notes); replacing the folder would delete them: move them out or name "
                              "another --out")


def lm_eval_tasks_dir(out_dir: str) -> str:
    """Where --lm-eval-text's task folder goes: beside the export, never inside it."""
    return (out_dir.rstrip(os.sep) or out_dir) + LM_EVAL_TASKS_SUFFIX


def check_lm_eval_tasks_dir(folder: str) -> None:
    """The task folder is written only if new, empty or holding just our task file: never through a
    link, never over someone's files."""
    if os.path.islink(folder):
        raise ConfigError(f"--lm-eval-text: the task folder {folder} is a symbolic link; remove it or name another "
                          "--out (the task folder is <out>" + LM_EVAL_TASKS_SUFFIX + ")")
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"--lm-eval-text: {folder} (the task folder, <out>{LM_EVAL_TASKS_SUFFIX}) exists and is "
                          "not a folder; move it or name another --out")
    if os.path.isdir(folder):
        other = sorted(n for n in os.listdir(folder)
                       if n != LM_EVAL_TASK_FILE or not _is_regular(os.path.join(folder, n)))
        if other:
            raise ConfigError(f"--lm-eval-text: the task folder {folder} holds {', '.join(other[:5])}, which "
                              f"consolidate did not write (it writes only {LM_EVAL_TASK_FILE}); move them or name "
                              "another --out")


def check_output(out: str, checkpoint: str, fmt: str, force: bool = False, lm_eval_text: Optional[str] = None) -> None:
    """Everything about consolidate's --out (a .pt file, or with fmt 'hf' a folder, and with
    --lm-eval-text its file and the task folder beside the export) that refuses it, before any
    checkpoint is read; ConfigError naming the fix."""
    if lm_eval_text is not None and not os.path.isfile(lm_eval_text):
        raise ConfigError(f"--lm-eval-text: file not found: {lm_eval_text}")
    _check_not_in_checkpoint(out, checkpoint)
    folder = os.path.dirname(os.path.abspath(out.rstrip(os.sep) or out))
    if not os.path.isdir(folder):
        raise ConfigError(f"--out: folder {folder} does not exist; create it first (mkdir -p) or name one in an "
                          "existing folder")
    check_output_folder(folder, "--out", "--out")
    if fmt == "hf":
        check_export_folder(out)
        if lm_eval_text is not None:
            check_lm_eval_tasks_dir(lm_eval_tasks_dir(out))
    else:
        _check_pt_out(out, force)


def write_failed(out: str, error: OSError) -> ConfigError:
    """The error for a write that failed after the checks (a full disk, a folder that refuses
    writes to root too, such as /proc/sys): named, with the fix, instead of a traceback."""
    return ConfigError(f"--out: could not write {out} ({error.strerror or error}); nothing was replaced: free space "
                       "or name an --out in a folder you can write to")


def write_consolidated(out: str, checkpoint: str, force: bool, state: Dict[str, torch.Tensor],
                       model_config: Dict[str, Any], tokenizer) -> None:
    """Write --format pt's file atomically (a temporary file of ours beside it, then a rename),
    after checking --out again: a file may have appeared there while the weights were read."""
    check_output(out, checkpoint, "pt", force)
    blob = {"format": PT_FORMAT, "state_dict": state, "model_config": model_config, "tokenizer": tokenizer}
    try:
        atomic_write(out, lambda f: torch.save(blob, f))
    except OSError as e:
        raise write_failed(out, e) from None
