"""An export Transformers loads: model.safetensors and config.json (S2MoEForCausalLM) and the
tokenizer (s2moe_tokenizer.json, tokenizer_config.json). It holds no Python: a process that has
imported s2moe_ds.hf loads it through the Auto classes without trust_remote_code, and
lm-evaluation-harness through `python -m s2moe_ds.hf.lm_eval --model s2moe`.

`remote_code_shims=True` (consolidate's --remote-code-shims) adds three one-line files that name
our classes, and the auto_map entries pointing at them, for a tool that can only load with
`trust_remote_code=True` and never imports s2moe_ds; that flag runs whatever .py files the
folder holds, so it is safe only on a folder one wrote oneself."""

import json
import os
import shutil
from typing import Dict, Optional

import torch

from ..checkpoint.output import (HF_EXPORT_FILES, HF_REMOTE_CODE_FILES, LM_EVAL_TASK_FILE, check_export_folder,
                                 check_lm_eval_tasks_dir, lm_eval_tasks_dir, write_failed)
from ..config import ConfigError
from ..fileio import atomic_write_text, new_folder_beside
from .modeling import S2MoEConfig, S2MoEForCausalLM
from .tokenizer import S2MoETokenizer

REMOTE_CODE = {
    "configuration_s2moe.py": ("s2moe_ds.hf.modeling", "S2MoEConfig"),
    "modeling_s2moe.py": ("s2moe_ds.hf.modeling", "S2MoEForCausalLM"),
    "tokenization_s2moe.py": ("s2moe_ds.hf.tokenizer", "S2MoETokenizer"),
}
AUTO_MAP = {"AutoConfig": "configuration_s2moe.S2MoEConfig", "AutoModelForCausalLM": "modeling_s2moe.S2MoEForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_s2moe.S2MoETokenizer", None]}
LM_EVAL_TASK = "s2moe_text"
# What a rerun may replace is listed once, in checkpoint.output (it must not import Transformers).
assert set(REMOTE_CODE) == set(HF_REMOTE_CODE_FILES) <= HF_EXPORT_FILES and LM_EVAL_TASK_FILE == f"{LM_EVAL_TASK}.yaml"


def check_out_dir(out_dir: str) -> None:
    """Replace only an earlier export (or nothing): never a folder of something else."""
    check_export_folder(out_dir, S2MoEConfig.model_type)


def export_hf(state: Dict[str, torch.Tensor], model_config: dict, tokenizer_path: str, out_dir: str,
              meta: Optional[dict] = None, remote_code_shims: bool = False) -> S2MoEForCausalLM:
    """Write the export of an ep_size-1 fp32 state dict (checkpoint.consolidate's) to `out_dir`,
    built in a sibling folder and renamed into place. Returns the model as exported.
    `remote_code_shims`: also write the trust_remote_code files and auto_map (module docstring)."""
    check_out_dir(out_dir)
    shims = {"auto_map": AUTO_MAP} if remote_code_shims else {}
    config = S2MoEConfig(s2moe_model=model_config, architectures=["S2MoEForCausalLM"],
                         torch_dtype="float32", s2moe_meta=meta or {}, **shims)
    model = S2MoEForCausalLM(config)
    prefix = S2MoEForCausalLM.base_model_prefix
    model.load_state_dict({f"{prefix}.{k}": v for k, v in state.items()}, strict=True)
    # Built in a new folder of our own beside out_dir ('.<name>.<random>.tmp'): no fixed name
    # that could be another's folder or a planted link. Removed if anything fails (it is ours).
    try:
        tmp = new_folder_beside(out_dir, "tmp")
    except OSError as e:
        raise write_failed(out_dir, e) from None
    try:
        _write_export(model, tokenizer_path, tmp, remote_code_shims)
        _swap_in(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failed(out_dir, e) from None
        raise
    return model


def _write_export(model: S2MoEForCausalLM, tokenizer_path: str, folder: str, remote_code_shims: bool) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    cfg = model.model.cfg
    # A backbone without memory has a longest input; with memory any length reads in segments.
    tokenizer = S2MoETokenizer(vocab_file=tokenizer_path, **({} if cfg.has_memory else {"model_max_length": cfg.max_seq_len}))
    tokenizer.save_pretrained(folder)
    if remote_code_shims:
        _write_shims(folder)


def _swap_in(staged: str, out_dir: str) -> None:
    """Rename the staged export to out_dir. What is there (check_out_dir lets through only an
    earlier export or an empty folder, checked again now) is first renamed onto a new empty folder
    of ours, then removed: nothing else is ever deleted."""
    check_out_dir(out_dir)
    out_dir = out_dir.rstrip(os.sep) or out_dir
    if not os.path.lexists(out_dir):
        os.replace(staged, out_dir)
        return
    old = new_folder_beside(out_dir, "old")
    try:
        os.replace(out_dir, old)  # onto an empty folder: rename(2) replaces it
    except OSError:
        os.rmdir(old)  # ours, still empty
        raise
    os.replace(staged, out_dir)
    shutil.rmtree(old)


def _write_shims(folder: str) -> None:
    tok_cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(tok_cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["auto_map"] = TOKENIZER_AUTO_MAP
    with open(tok_cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    for name, (module, cls) in REMOTE_CODE.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(f"# Loaded by trust_remote_code; the class is s2moe_ds's (pip install 's2moe-ds[hf]').\n"
                    f"from {module} import {cls}  # noqa: F401\n")


def write_lm_eval_task(text_path: str, out_dir: str) -> str:
    """An lm-evaluation-harness task (its folder, for --include_path) that scores `text_path`
    whole as one document with rolling log-likelihoods: word and byte perplexity and bits per
    byte. The folder is `<out_dir>-lm_eval_tasks`, beside the export and never inside it: lm_eval
    runs what a task folder names, so one that travels with an export must never be included.
    Returns the folder."""
    if not os.path.isfile(text_path):
        raise ConfigError(f"--lm-eval-text: file not found: {text_path}")
    folder = lm_eval_tasks_dir(out_dir)
    check_lm_eval_tasks_dir(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        atomic_write_text(os.path.join(folder, LM_EVAL_TASK_FILE), _task_yaml(text_path))
    except OSError as e:
        raise write_failed(folder, e) from None
    return folder


def _task_yaml(text_path: str) -> str:
    # JSON strings are valid YAML scalars, so any path quotes safely.
    path = json.dumps(os.path.abspath(text_path))
    return f"""task: {LM_EVAL_TASK}
dataset_path: text
dataset_kwargs:
  data_files:
    test: {path}
  sample_by: document
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""
