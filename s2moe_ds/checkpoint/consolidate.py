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
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..config import ConfigError
from ..models import ModelConfig, build_model, model_config_from_dict
from ..parallel import deepspeed_internals as ds
from .compat import upgrade_meta
from . import manifest
from .safe_load import load_file
from .store import LATEST, complete_tags, newest_verified, step_of_name, step_tag


def _has_step_folders(path: str) -> bool:
    return os.path.isdir(path) and any(step_of_name(d) is not None for d in os.listdir(path))


def _named_tag(ckpt_dir: str, tag: str) -> str:
    """--tag's step folder (its name, or the step number) among the complete ones; else ConfigError."""
    name = step_tag(int(tag)) if tag.isascii() and tag.isdigit() else tag  # int('²') would raise
    tags = complete_tags(ckpt_dir)
    if name not in tags:
        have = ", ".join(reversed(tags)) or "none"
        raise ConfigError(f"--tag: {ckpt_dir} holds no complete checkpoint {tag!r} (complete: {have}); name one of "
                          "those (or its step number), or leave --tag out for the newest that verifies")
    return name


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> str:
    """A step folder from a run folder, its checkpoints/ folder or the step folder itself; `tag`
    (a step folder's name or step number) picks a complete one of a run or checkpoints/ folder."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(candidate, ds.MODEL_STATES)):
            return candidate
        if os.path.isfile(os.path.join(candidate, LATEST)) or _has_step_folders(candidate):
            chosen = _named_tag(candidate, tag) if tag is not None else newest_verified(candidate, "--checkpoint")
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


def model_config_for_inference(client: Dict[str, Any], eval_k: Optional[int] = None,
                               state: Optional[Mapping[str, Any]] = None, where: str = "--checkpoint") -> ModelConfig:
    """The checkpoint's model config, optionally with another eval_k; given the stored weights
    (`state`: tensors or shapes), refused unless they fit it (check_config_fits)."""
    if "classifier" in client:
        raise ConfigError("--checkpoint: this is a fine-tuned classifier (launch/finetune.py), not a language "
                          "model; launch/finetune.py wrote its evaluation to the run's finetune_eval.json")
    try:
        cfg = model_config_from_dict(client["model_config"])
    except TypeError as e:  # a field this version does not know
        raise ConfigError(f"{where}: its model config is not one of ours ({e})") from None
    if state is not None:
        check_config_fits(cfg, state, where)
    if eval_k is not None:
        cfg = replace(cfg, moe=replace(cfg.moe, eval_k=eval_k))
    return cfg


def model_from_state(state: Dict[str, torch.Tensor], client: Dict[str, Any], eval_k: Optional[int] = None,
                     where: str = "--checkpoint"):
    """The checkpoint's model on one process (ep_size 1), in eval mode, from a consolidated state
    dict; its model config is checked against the weights' shapes before the model is built."""
    model = build_model(model_config_for_inference(client, eval_k, state, where))
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(path: str, eval_k: Optional[int] = None, tag: Optional[str] = None):
    """(the model in eval mode with the checkpoint's weights on one process, its client state)."""
    step_dir = resolve_checkpoint(path, tag)
    state, client = consolidate(step_dir)
    return model_from_state(state, client, eval_k, f"--checkpoint: {os.path.join(step_dir, ds.MODEL_STATES)}"), client


def stored_shapes(step_dir: str) -> Dict[str, Tuple[int, ...]]:
    """The shapes of the weights consolidate() returns, read without their data (meta tensors)."""
    manifest.verify(step_dir)
    states = load_file(os.path.join(step_dir, ds.MODEL_STATES), map_location="meta")
    shapes = {k: tuple(v.shape) for k, v in states["module"].items()}
    for f in sorted(glob.glob(os.path.join(step_dir, ds.EXPERT_STATES_GLOB))):
        shapes.update({k: tuple(v.shape) for k, v in load_file(f, map_location="meta").items()})
    return shapes


def check_config_fits(cfg: ModelConfig, state: Mapping[str, Any], where: str) -> None:
    """Refuse a model config its stored weights do not fit, naming the field and `where` (the file),
    before anything is allocated: a config read from a file could ask for any size. First bounds
    read off the shapes, which also keep the next step small; then every tensor of the model built
    on the meta device (no memory) against the stored one."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state.items()}
    _check_size_bounds(cfg, shapes, where)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    except (RuntimeError, ValueError, OverflowError) as e:
        raise ConfigError(f"{where}: its model config cannot be built ({e}); the file was altered or damaged") from None
    _compare_shapes(cfg, expected, shapes, where)


def _size_fields(cfg: ModelConfig) -> Dict[str, int]:
    """Every integer setting of the config, nested ones by dotted name (model_config.moe.num_experts)."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, int) and not isinstance(v, bool):
                out[prefix + k] = v
    walk(cfg.to_dict(), "model_config.")
    return out


def _check_size_bounds(cfg: ModelConfig, shapes: Dict[str, Tuple[int, ...]], where: str) -> None:
    largest = max((d for s in shapes.values() for d in s), default=0)
    for name in ("vocab_size", "d_model", "d_inner"):
        value = getattr(cfg, name)
        if value > largest:
            raise ConfigError(f"{where}: model_config.{name}={value} exceeds every dimension of the stored weights "
                              f"(largest {largest}); the file's model config was altered or belongs to another "
                              "checkpoint, nothing was built")
    # Each layer and each expert holds at least one tensor of its own.
    count = len(shapes)
    moe_layers = cfg.n_layer // cfg.moe_every if cfg.moe.routed else 0
    for name, value, needs in (("n_layer", cfg.n_layer, cfg.n_layer),
                               ("moe.num_experts", cfg.moe.num_experts, moe_layers * cfg.moe.num_experts)):
        if needs > count:
            raise ConfigError(f"{where}: model_config.{name}={value} needs more than the {count} tensors the file "
                              "stores; the file's model config was altered or belongs to another checkpoint, "
                              "nothing was built")


def _compare_shapes(cfg: ModelConfig, expected: Dict[str, Tuple[int, ...]], shapes: Dict[str, Tuple[int, ...]],
                    where: str) -> None:
    wrong = [k for k in expected if k in shapes and expected[k] != shapes[k]]
    if wrong:
        key = wrong[0]
        dims = set(expected[key]) - set(shapes[key])
        fields = [f"{n}={v}" for n, v in _size_fields(cfg).items() if v in dims] or ["its sizes"]
        raise ConfigError(f"{where}: its model config does not fit its weights: {key} is stored as {shapes[key]}, "
                          f"{' or '.join(fields)} gives {expected[key]} ({len(wrong)} tensor(s) differ); the file's "
                          "model config was altered or belongs to another checkpoint")
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        c = cfg
        layout = (f"n_layer={c.n_layer}, moe_every={c.moe_every}, moe.block={c.moe.block!r}, "
                  f"moe.router={c.moe.router!r}, moe.num_experts={c.moe.num_experts}")
        details = "; ".join(p for p in (f"the config's model has {len(missing)} weight(s) the file lacks, e.g. "
                                        f"{missing[:3]}" if missing else "",
                                        f"the file has {len(extra)} weight(s) the config's model lacks, e.g. "
                                        f"{extra[:3]}" if extra else "") if p)
        raise ConfigError(f"{where}: its model config ({layout}) does not fit its weights: {details}; the file's "
                          "model config was altered or belongs to another checkpoint")


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
