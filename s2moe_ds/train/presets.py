"""Named presets: functions that return whole experiment configs; flags and overrides replace fields.

    tiny         2 layers, d_model 64, 4 heads, d_inner 128, 4 experts top-2: about 0.1 s per
                 step on 2 CPU cores, for tests and the README's demo
    paper-small  the paper's 4 layers, d_model 256, 8 heads, d_inner 512, 16 experts top-2
                 (docs/method.md, from the authors' sister code), on the GPT backbone
    txl-tiny     tiny's sizes on Transformer-XL, segments of 64 with a memory of 64: for CPUs
    txl-base     the paper's own setup (the sister code's enwik8/text8 base): Transformer-XL, 4
                 layers, d_model 256, 8 heads of 64, d_inner 512, dropout 0.1, 16 experts top-2,
                 tgt_len 512, mem_len 512, lr 3.5e-4, 100k steps on enwik8; for GPU clusters,
                 with ds_configs/txl_base.json (Adam, global batch 44)
    txl-lm1b     txl-base's model and schedule on One Billion Word (word-level: words seen >= 3
                 times in training, <S>/</S>/<unk>), with ds_configs/txl_lm1b.json (global batch 11,
                 the paper's for this corpus)
"""

import copy
from typing import Any, Callable, Dict

from ..config import check_choice
from ..data import DataConfig
from ..models import ModelConfig, TransformerXLConfig, model_config_from_dict
from ..moe import MoEConfig
from ..moe.config import settings_dict
from .config import ExperimentConfig, TrainConfig


def tiny() -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(n_layer=2, d_model=64, n_head=4, d_inner=128, max_seq_len=64,
                                              dropout=0.0, moe=MoEConfig(num_experts=4, k=2)))


def paper_small() -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(n_layer=4, d_model=256, n_head=8, d_inner=512, max_seq_len=512,
                                              dropout=0.1, moe=MoEConfig(num_experts=16, k=2)))


def txl_tiny() -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(backbone="txl", n_layer=2, d_model=64, n_head=4, d_inner=128,
                                              max_seq_len=64, dropout=0.0, moe=MoEConfig(num_experts=4, k=2),
                                              backbone_config=TransformerXLConfig(mem_len=64)))


def txl_base() -> ExperimentConfig:
    # Transformer-XL's enwik8 scripts decay the cosine schedule to zero without warmup.
    return ExperimentConfig(
        model=ModelConfig(backbone="txl", n_layer=4, d_model=256, n_head=8, d_inner=512, max_seq_len=512,
                          dropout=0.1, moe=MoEConfig(num_experts=16, k=2),
                          backbone_config=TransformerXLConfig(d_head=64, mem_len=512)),
        data=DataConfig(dataset="enwik8"),
        train=TrainConfig(out_dir="runs/txl-base", max_steps=100_000, seq_len=512, lr=3.5e-4, warmup_steps=0,
                          min_lr_ratio=0.0, eval_interval=4000, save_interval=4000))


def txl_lm1b() -> ExperimentConfig:
    # The sister code's batch for One Billion Word is 11 (44 for enwik8/text8): DeepSpeed's
    # train_batch_size in ds_configs/txl_lm1b.json; the rest is txl-base's.
    base = txl_base()
    return ExperimentConfig(model=base.model, data=DataConfig(dataset="one-billion-word"),
                            train=TrainConfig(**{**base.train.to_dict(), "out_dir": "runs/txl-lm1b"}))


PRESETS: Dict[str, Callable[[], ExperimentConfig]] = {"tiny": tiny, "paper-small": paper_small, "txl-tiny": txl_tiny,
                                                      "txl-base": txl_base, "txl-lm1b": txl_lm1b}


def _merge_moe(base: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    """The preset's moe settings with `given` on top. A block kind or router that changes starts
    from its own defaults: the preset's settings belong to the one it replaces."""
    out = {**base, **{k: v for k, v in given.items() if k not in ("block_config", "router_config")}}
    for kind, settings in (("block", "block_config"), ("router", "router_config")):
        own = base.get(settings) if out[kind] == base[kind] else None
        out[settings] = {**settings_dict(own), **settings_dict(given.get(settings))} or None
    return out


def _merge_model(base: Dict[str, Any], given: Dict[str, Any]) -> Dict[str, Any]:
    """The same for the model: a backbone that changes starts from its own settings' defaults."""
    given = copy.deepcopy(given)
    if "moe" in given:
        given["moe"] = _merge_moe(base["moe"], given["moe"])
    out = {**base, **given}
    own = base.get("backbone_config") if out.get("backbone", "gpt") == base.get("backbone", "gpt") else None
    out["backbone_config"] = {**settings_dict(own), **settings_dict(given.get("backbone_config"))} or None
    return out


def apply_overrides(experiment: ExperimentConfig, overrides: Dict[str, Dict[str, Any]]) -> ExperimentConfig:
    """`experiment` with the fields of `overrides` ({'model': {..., 'moe': {...}}, 'parallel': ...,
    'data': ..., 'train': ..., 'task': 'lm'}) replaced, validated again as a whole."""
    d = experiment.to_dict()
    for section, values in overrides.items():
        check_choice(section, "overrides", tuple(d))
        if section == "model":
            d[section] = _merge_model(d[section], values)
        elif isinstance(d[section], dict) and isinstance(values, dict):
            d[section] = {**d[section], **values}
        else:  # the task's name, or data for a task that had none (ExperimentConfig names what is wrong)
            d[section] = values
    return ExperimentConfig(**d)


PROTOCOLS: Dict[str, Dict[str, Any]] = {
    "deepspeed": {"overrides": {}, "router_config": {}, "block_config": {}},
    # Where the authors' sister code (FastMoE on Transformer-XL) trains otherwise than DeepSpeed's
    # MoE, each part also a field of its own: ReLU experts, no capacity (no token is dropped),
    # deterministic top-k (no Gumbel second expert, no random token selection), the balance loss
    # over every top-k assignment, and InfoNCE negatives over the whole data-parallel batch.
    "sister": {"overrides": {"model": {"activation": "relu", "moe": {"drop_tokens": False}}},
               # By router: the baselines' routers have sister variants of their own (docs/routers.md).
               "router_config": {"topk": {"use_rts": False, "top2_2nd_expert_sampling": False,
                                          "balance_loss": "all_assignments"}},
               "block_config": {"s2moe": {"uncertainty_negatives": "global"}}},
}
"""Training protocols by name: overrides of any experiment, and settings of the router and block
kind it uses."""


def apply_protocol(experiment: ExperimentConfig, name: str) -> ExperimentConfig:
    """`experiment` trained as protocol `name` trains (PROTOCOLS); flags given after still win."""
    check_choice(name, "protocol", tuple(PROTOCOLS))
    overrides = copy.deepcopy(PROTOCOLS[name]["overrides"])
    moe = experiment.model.moe
    for settings, chosen in (("router_config", moe.router), ("block_config", moe.block)):
        own = PROTOCOLS[name][settings].get(chosen)
        if own:
            overrides.setdefault("model", {}).setdefault("moe", {})[settings] = dict(own)
    return apply_overrides(experiment, overrides)


def preset(name: str, overrides: Dict[str, Dict[str, Any]] = None) -> ExperimentConfig:
    check_choice(name, "preset", tuple(PRESETS))
    return apply_overrides(PRESETS[name](), overrides or {})


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a preset; `overrides` replace fields (moe fields via moe=dict(...))."""
    check_choice(name, "model.preset", tuple(PRESETS))
    return model_config_from_dict(_merge_model(PRESETS[name]().model.to_dict(), overrides))
