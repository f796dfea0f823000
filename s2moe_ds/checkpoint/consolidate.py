"""One fp32 state dict from any of our checkpoints (ZeRO 0/1/2, any ep_size, any format), without
DeepSpeed or a process group.

DeepSpeed's zero_to_fp32.py stops at the per-expert files of native MoE ("... is not a model state
checkpoint"). Here the non-expert weights come from the engine's model-states file and every expert
from its per-expert file, which DeepSpeed already names (file and keys) by GLOBAL expert id:
together they are exactly the state dict of the same model built with ep_size 1.

Weights are the module's: exact for fp32 training; for bf16 training they are the bf16 weights
cast to fp32 (the fp32 master copies live in ZeRO's optimizer shards).
"""

import glob
import os
from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import ConfigError
from ..models import ModelConfig, build_model, model_config_from_dict
from ..parallel import deepspeed_internals as ds
from .compat import upgrade_meta
from . import manifest
from .safe_load import load_file
from .store import LATEST, newest_verified


def _has_step_folders(path: str) -> bool:
    return os.path.isdir(path) and any(d.startswith("step") for d in os.listdir(path))


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> str:
    """A step folder from a run folder, its checkpoints/ folder or the step folder itself."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(candidate, ds.MODEL_STATES)):
            return candidate
        if os.path.isfile(os.path.join(candidate, LATEST)) or (tag is None and _has_step_folders(candidate)):
            chosen = tag or newest_verified(candidate, "--checkpoint")
            if chosen is None:
                break
            return os.path.join(candidate, chosen)
    raise ConfigError(f"--checkpoint: {path} holds no checkpoint (no {ds.MODEL_STATES} nor a '{LATEST}' file); "
                      "pass a run folder, its checkpoints/ folder or a step folder")


def consolidate(path: str, tag: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(fp32 state dict for ep_size 1, the checkpoint's client state in the current format)."""
    step_dir = resolve_checkpoint(path, tag)
    manifest.verify(step_dir)
    states = load_file(os.path.join(step_dir, ds.MODEL_STATES))
    merged = dict(states["module"])
    for f in sorted(glob.glob(os.path.join(step_dir, ds.EXPERT_STATES_GLOB))):
        merged.update(load_file(f))
    fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in merged.items()}
    client = {k: v for k, v in states.items() if k not in ds.CLIENT_STATE_SKIP}
    if "model_config" not in client:
        raise ConfigError(f"--checkpoint: {step_dir} records no model config (client state 'model_config'); "
                          "it was not written by s2moe_ds.train")
    return fp32, upgrade_meta(client, f"--checkpoint: {step_dir}")


def model_config_for_inference(client: Dict[str, Any], eval_k: Optional[int] = None) -> ModelConfig:
    """The checkpoint's model config, optionally with another eval_k."""
    if "classifier" in client:
        raise ConfigError("--checkpoint: this is a fine-tuned classifier (launch/finetune.py), not a language "
                          "model; launch/finetune.py wrote its evaluation to the run's finetune_eval.json")
    cfg = model_config_from_dict(client["model_config"])
    if eval_k is not None:
        cfg = replace(cfg, moe=replace(cfg.moe, eval_k=eval_k))
    return cfg


def model_from_state(state: Dict[str, torch.Tensor], client: Dict[str, Any], eval_k: Optional[int] = None):
    """The checkpoint's model on one process (ep_size 1), in eval mode, from a consolidated state dict."""
    model = build_model(model_config_for_inference(client, eval_k))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(path: str, eval_k: Optional[int] = None, tag: Optional[str] = None):
    """(the model in eval mode with the checkpoint's weights on one process, its client state)."""
    state, client = consolidate(path, tag)
    return model_from_state(state, client, eval_k), client


def load_global_state(module: torch.nn.Module, state: Dict[str, torch.Tensor], layout, where: str) -> None:
    """Copy an ep_size-1 state dict (consolidate's) into `module`, built for this rank's expert
    layout (parallel.ExpertLayout): each local expert takes its global expert's weights, so a
    checkpoint of any layout starts a run of any other. Every weight of `module` must be there with
    its shape, and every non-expert weight of `state` must be used; else ConfigError naming `where`."""
    own = module.state_dict()
    wanted = {name: layout.global_param_name(name) for name in own}
    missing = [g for g in wanted.values() if g not in state]
    used = set(wanted.values())
    unused = [k for k in state if k not in used and ds.EXPERT_PARAM_PREFIX not in k]
    wrong = [f"{g}: {tuple(state[g].shape)} vs {tuple(own[n].shape)}" for n, g in wanted.items()
             if g in state and state[g].shape != own[n].shape]
    if missing or unused or wrong:
        details = "; ".join(part for part in (
            f"missing {missing[:4]}" if missing else "", f"not in this model {unused[:4]}" if unused else "",
            f"other shapes {wrong[:4]}" if wrong else "") if part)
        raise ConfigError(f"{where}: its weights do not fit this model ({details}); start from a checkpoint of "
                          "the same architecture")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[wanted[name]].to(tensor.dtype))
