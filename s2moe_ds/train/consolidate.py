"""One fp32 state dict from any of our checkpoints (ZeRO 0/1/2, any ep_size), without DeepSpeed
or a process group.

DeepSpeed's zero_to_fp32.py stops at the per-expert files of native MoE ("... is not a model state
checkpoint"). Here the non-expert weights come from mp_rank_00_model_states.pt and every expert
from its layer_<l>_expert_<e>_* file, which DeepSpeed already names by GLOBAL expert id: together
they are exactly the state dict of the same model built with ep_size 1.

Weights are the module's: exact for fp32 training; for bf16 training they are the bf16 weights
cast to fp32 (the fp32 master copies live in ZeRO's optimizer shards).
"""

import glob
import os
from typing import Any, Dict, Optional, Tuple

import torch

from ..config import ConfigError, ModelConfig
from .checkpoint import latest_tag

MODEL_STATES = "mp_rank_00_model_states.pt"


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> str:
    """A step folder from a run folder, its checkpoints/ folder or the step folder itself."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(candidate, MODEL_STATES)):
            return candidate
        if os.path.isfile(os.path.join(candidate, "latest")):
            return os.path.join(candidate, tag or latest_tag(candidate))
    raise ConfigError(f"--checkpoint: {path} holds no checkpoint (no {MODEL_STATES} nor a 'latest' file); "
                      "pass a run folder, its checkpoints/ folder or a step folder")


def consolidate(path: str, tag: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(fp32 state dict for ep_size 1, the checkpoint's client state)."""
    step_dir = resolve_checkpoint(path, tag)
    states = torch.load(os.path.join(step_dir, MODEL_STATES), map_location="cpu", weights_only=False)
    merged = dict(states["module"])
    expert_files = sorted(glob.glob(os.path.join(step_dir, "layer_*_expert_*_model_states.pt")))
    for f in expert_files:
        merged.update(torch.load(f, map_location="cpu", weights_only=False))
    fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in merged.items()}
    client = {k: v for k, v in states.items() if k not in ("module", "optimizer", "lr_scheduler")}
    return fp32, client


def model_config_for_inference(client: Dict[str, Any], eval_k: Optional[int] = None) -> ModelConfig:
    """The checkpoint's model config on one process (ep_size 1), optionally with another eval_k."""
    cfg = dict(client["model_config"])
    moe = dict(cfg.pop("moe"), ep_size=1)
    if eval_k is not None:
        moe["eval_k"] = eval_k
    return ModelConfig(**cfg, moe=moe)


def build_model(state: Dict[str, torch.Tensor], client: Dict[str, Any], eval_k: Optional[int] = None):
    """A LanguageModel in eval mode from a consolidated state dict (see consolidate)."""
    from ..models import LanguageModel
    model = LanguageModel(model_config_for_inference(client, eval_k))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(path: str, eval_k: Optional[int] = None, tag: Optional[str] = None):
    """A LanguageModel in eval mode with the checkpoint's weights, on one process."""
    state, client = consolidate(path, tag)
    return build_model(state, client, eval_k), client
