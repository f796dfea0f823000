"""Named presets: functions that return whole experiment configs; flags and overrides replace fields.

    tiny         2 layers, d_model 64, 4 heads, d_inner 128, 4 experts top-2: about 0.1 s per
                 step on 2 CPU cores, for tests and the README's demo
    paper-small  the paper's 4 layers, d_model 256, 8 heads, d_inner 512, 16 experts top-2
                 (docs/method.md, from the authors' sister code)
"""

import copy
from typing import Any, Callable, Dict

from ..config import check_choice
from ..models import ModelConfig, model_config_from_dict
from ..moe import MoEConfig
from ..moe.config import settings_dict
from .config import ExperimentConfig


def tiny() -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(n_layer=2, d_model=64, n_head=4, d_inner=128, max_seq_len=64,
                                              dropout=0.0, moe=MoEConfig(num_experts=4, k=2)))


def paper_small() -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(n_layer=4, d_model=256, n_head=8, d_inner=512, max_seq_len=512,
                                              dropout=0.1, moe=MoEConfig(num_experts=16, k=2)))


PRESETS: Dict[str, Callable[[], ExperimentConfig]] = {"tiny": tiny, "paper-small": paper_small}


def _merge_moe(base: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    """The preset's moe settings with `given` on top. A block kind or router that changes starts
    from its own defaults: the preset's settings belong to the one it replaces."""
    out = {**base, **{k: v for k, v in given.items() if k not in ("block_config", "router_config")}}
    for kind, settings in (("block", "block_config"), ("router", "router_config")):
        own = base.get(settings) if out[kind] == base[kind] else None
        out[settings] = {**settings_dict(own), **settings_dict(given.get(settings))} or None
    return out


def _merge_model(base: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    given = copy.deepcopy(given)
    if "moe" in given:
        given["moe"] = _merge_moe(base["moe"], given["moe"])
    return {**base, **given}


def apply_overrides(experiment: ExperimentConfig, overrides: Dict[str, Dict[str, Any]]) -> ExperimentConfig:
    """`experiment` with the fields of `overrides` ({'model': {..., 'moe': {...}}, 'parallel': ...,
    'data': ..., 'train': ...}) replaced, validated again as a whole."""
    d = experiment.to_dict()
    for section, values in overrides.items():
        check_choice(section, "overrides", tuple(d))
        d[section] = _merge_model(d[section], values) if section == "model" else {**d[section], **values}
    return ExperimentConfig(**d)


def preset(name: str, overrides: Dict[str, Dict[str, Any]] = None) -> ExperimentConfig:
    check_choice(name, "preset", tuple(PRESETS))
    return apply_overrides(PRESETS[name](), overrides or {})


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset; `overrides` replace fields (moe fields via moe=dict(...))."""
    check_choice(name, "model.preset", tuple(PRESETS))
    return model_config_from_dict(_merge_model(PRESETS[name]().model.to_dict(), overrides))
