"""An export Transformers loads: model.safetensors and config.json (S2MoEForCausalLM), the
tokenizer (s2moe_tokenizer.json, tokenizer_config.json), and three one-line files that name the
classes for `trust_remote_code=True`, so that a tool that never imports s2moe_ds itself
(lm-evaluation-harness, a notebook) still gets our model, given s2moe_ds is installed."""

import json
import os
import shutil
from typing import Dict, Optional

import torch

from ..checkpoint.output import check_export_folder
from ..config import ConfigError
from ..fileio import new_folder_beside
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


def check_out_dir(out_dir: str) -> None:
    """Replace only an earlier export (or nothing): never a folder of something else."""
    check_export_folder(out_dir, S2MoEConfig.model_type)


def export_hf(state: Dict[str, torch.Tensor], model_config: dict, tokenizer_path: str, out_dir: str,
              meta: Optional[dict] = None) -> S2MoEForCausalLM:
    """Write the export of an ep_size-1 fp32 state dict (checkpoint.consolidate's) to `out_dir`,
    built in a sibling folder and renamed into place. Returns the model as exported."""
    check_out_dir(out_dir)
    config = S2MoEConfig(s2moe_model=model_config, auto_map=AUTO_MAP, architectures=["S2MoEForCausalLM"],
                         torch_dtype="float32", s2moe_meta=meta or {})
    model = S2MoEForCausalLM(config)
    prefix = S2MoEForCausalLM.base_model_prefix
    model.load_state_dict({f"{prefix}.{k}": v for k, v in state.items()}, strict=True)
    # Built in a new folder of our own beside out_dir ('.<name>.<random>.tmp'): no fixed name
    # that could be another's folder or a planted link.
    tmp = new_folder_beside(out_dir, "tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    cfg = model.model.cfg
    # A backbone without memory has a longest input; with memory any length reads in segments.
    tokenizer = S2MoETokenizer(vocab_file=tokenizer_path, **({} if cfg.has_memory else {"model_max_length": cfg.max_seq_len}))
    tokenizer.save_pretrained(tmp)
    tok_cfg_path = os.path.join(tmp, "tokenizer_config.json")
    with open(tok_cfg_path) as f:
        tok_cfg = json.load(f)
    tok_cfg["auto_map"] = TOKENIZER_AUTO_MAP
    with open(tok_cfg_path, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    for name, (module, cls) in REMOTE_CODE.items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(f"# Loaded by trust_remote_code; the class is s2moe_ds's (pip install 's2moe-ds[hf]').\n"
                    f"from {module} import {cls}  # noqa: F401\n")
    _swap_in(tmp, out_dir)
    return model


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
    os.replace(out_dir, old)  # onto an empty folder: rename(2) replaces it
    os.replace(staged, out_dir)
    shutil.rmtree(old)


def write_lm_eval_task(text_path: str, out_dir: str) -> str:
    """An lm-evaluation-harness task (its folder, for --include_path) that scores `text_path`
    whole as one document with rolling log-likelihoods: word and byte perplexity and bits per
    byte. Returns the folder."""
    if not os.path.isfile(text_path):
        raise ConfigError(f"--lm-eval-text: file not found: {text_path}")
    folder = os.path.join(out_dir, "lm_eval_tasks")
    os.makedirs(folder, exist_ok=True)
    # JSON strings are valid YAML scalars, so any path quotes safely.
    path = json.dumps(os.path.abspath(text_path))
    with open(os.path.join(folder, f"{LM_EVAL_TASK}.yaml"), "w") as f:
        f.write(f"""task: {LM_EVAL_TASK}
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
""")
    return folder
