"""Checkpoints written before the current format: what changed, and how they are read.

Format 1 (before the redesign of issue 11; no `format_version` key): the model config named the
block kind in `moe.router` ('s2moe', 'smoe', 'dense'), held `moe.ep_size`, the S2MoE settings in
`moe.s2moe` and DeepSpeed's gate settings in `moe`. Its module tree and state-dict keys are those
of format 2, so its weights, optimizer states and data position load unchanged; only the config
is rewritten, into the config this code would have written for the same model.

Format 2: `moe.block`, `moe.router`, `moe.block_config`, `moe.router_config`; the parallel
layout apart (`ep_size` in the checkpoint's meta, never in the model config).
"""

from typing import Any, Dict

from ..config import ConfigError

FORMAT_VERSION = 2

_TOPK_FIELDS_V1 = ("noisy_gate_policy", "use_rts", "top2_2nd_expert_sampling")


def format_version(state: Dict[str, Any]) -> int:
    return int(state.get("format_version", 1))


def upgrade_model_config(model_config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A model config dict of any known format as format 2 writes it (every field present)."""
    from ..models import model_config_from_dict
    from ..moe import BLOCKS
    from ..moe.config import BLOCK_OF_OLD_ROUTER
    cfg = dict(model_config)
    moe = dict(cfg.get("moe") or {})
    if "block" not in moe:
        router = moe.pop("router", "s2moe")
        if router not in BLOCK_OF_OLD_ROUTER:
            raise ConfigError(f"{where}: its model config names router {router!r}, which no version of s2moe-ds "
                              "wrote; the checkpoint is not one of ours or is damaged")
        moe.pop("ep_size", None)
        block = BLOCK_OF_OLD_ROUTER[router]
        # Format 1 carried S2MoE's settings for every router; only the kind that has settings keeps them.
        s2moe = moe.pop("s2moe", None)
        router_config = {name: moe.pop(name) for name in _TOPK_FIELDS_V1 if name in moe}
        moe.update(block=block, router="topk", router_config=router_config,
                   block_config=s2moe if BLOCKS[block].config is not None else None)
        cfg["moe"] = moe
    try:
        return model_config_from_dict(cfg).to_dict()
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: its model config cannot be read by this version ({e}); evaluate or resume it "
                          "with the version that wrote it") from None


def upgrade_meta(meta: Dict[str, Any], where: str) -> Dict[str, Any]:
    """meta.json (or the client state's same keys) in format 2."""
    version = format_version(meta)
    if version > FORMAT_VERSION:
        raise ConfigError(f"{where}: written in checkpoint format {version} by a newer s2moe-ds; this version reads "
                          f"formats up to {FORMAT_VERSION}, so upgrade s2moe-ds to use it")
    out = dict(meta, format_version=FORMAT_VERSION)
    if "model_config" in out:
        out["model_config"] = upgrade_model_config(out["model_config"], where)
    return out
