"""Bad settings fail at construction with an error that names the field."""

import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.models import ModelConfig
from s2moe_ds.moe import FFN, MoEConfig, S2MoE, S2MoEConfig
from s2moe_ds.parallel import ParallelConfig
from s2moe_ds.train import ExperimentConfig


@pytest.mark.parametrize("field,value", [
    ("noise_scale", -1.0),
    ("noise_stats", "batch"),
    ("detach_noise_stats", "yes"),
    ("mix_gate_init_bias", float("nan")),
    ("eval_noise", "gaussian"),
    ("uncertainty_coef", -0.1),
    ("uncertainty_tau", 0.0),
    ("uncertainty_tokens", 1),
    ("uncertainty_on", "hidden"),
])
def test_s2moe_fields_are_validated_by_name(field, value):
    with pytest.raises(ConfigError, match=rf"s2moe\.{field}:"):
        S2MoEConfig(**{field: value})
    # The layer validates the same fields with the same messages before building anything.
    with pytest.raises(ConfigError, match=rf"s2moe\.{field}:"):
        S2MoE(8, FFN(8, 16), num_experts=2, **{field: value})


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_experts=0), "num_experts"),
    (dict(k=5, num_experts=4), "k"),
    (dict(k=0), "k"),
    (dict(eval_k=3, num_experts=2), "eval_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(min_capacity=-1), "min_capacity"),
])
def test_routing_fields_are_validated_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=rf"moe\.{field}:"):
        MoEConfig(**kwargs)
    with pytest.raises(ConfigError, match=rf"{field}:"):
        S2MoE(8, FFN(8, 16), **{"num_experts": 4, **kwargs})


def test_router_and_layout_fields_are_validated_by_name():
    # The router's own settings are its config's, named by the router.
    with pytest.raises(ConfigError, match=r"topk\.noisy_gate_policy:"):
        MoEConfig(router_config=dict(noisy_gate_policy="Gaussian"))
    with pytest.raises(ConfigError, match=r"noisy_gate_policy:"):
        S2MoE(8, FFN(8, 16), num_experts=4, noisy_gate_policy="Gaussian")
    # The layout is not the architecture: divisibility is checked where both meet.
    with pytest.raises(ConfigError, match=r"moe\.num_experts: must be divisible by parallel\.ep_size"):
        ExperimentConfig(model=ModelConfig(moe=MoEConfig(num_experts=6)), parallel=ParallelConfig(ep_size=4))
    with pytest.raises(ConfigError, match=r"num_experts:"):
        S2MoE(8, FFN(8, 16), num_experts=6, ep_size=4)
    with pytest.raises(ConfigError, match=r"parallel\.ep_size:"):
        ParallelConfig(ep_size=0)


def test_block_router_and_coefficient_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match=r"moe\.router: must be one of 'topk', 'xmoe', 'stablemoe', 'smoe_dropout'"):
        MoEConfig(router="hash")
    with pytest.raises(ConfigError, match=r"moe\.block: must be one of 'dense', 'moe', 's2moe'"):
        MoEConfig(block="xmoe")
    # The names of before the redesign, where --router named the block kind, say what moved.
    with pytest.raises(ConfigError, match=r"moe\.router: 'smoe' names a block kind.*use block 'moe' \(flag --moe\.block\)"):
        MoEConfig(router="smoe")
    with pytest.raises(ConfigError, match=r"moe\.block_config: unknown field\(s\) 'noise'"):
        MoEConfig(block_config=dict(noise=1.0))
    with pytest.raises(ConfigError, match=r"moe\.block_config: block 'moe' has no settings of its own"):
        MoEConfig(block="moe", block_config=dict(noise_scale=1.0))
    with pytest.raises(ConfigError, match=r"moe\.balance_coef: .*uncertainty_coef 0"):
        MoEConfig(balance_coef=0.0)
    MoEConfig(balance_coef=0.0, block_config=S2MoEConfig(uncertainty_coef=0.0))  # consistent: accepted
    with pytest.raises(ConfigError, match=r"hidden_size:"):
        S2MoE(0, FFN(8, 16))
    with pytest.raises(ConfigError, match=r"expert: must be a torch.nn.Module"):
        S2MoE(8, lambda x: x)


def test_config_round_trips_through_a_dict():
    cfg = MoEConfig(num_experts=8, block_config=S2MoEConfig(noise_scale=0.5))
    again = MoEConfig(**cfg.to_dict())
    assert again == cfg and again.block_config.noise_scale == 0.5 and again.resolved_eval_k == 2


def test_presets_take_overrides_and_a_new_block_kind_starts_from_its_own_defaults():
    from s2moe_ds.train import preset
    exp = preset("tiny", {"model": {"moe": {"block_config": {"noise_scale": 0.5}}}, "parallel": {"ep_size": 2},
                          "train": {"max_steps": 7}})
    assert exp.model.moe.block_config.noise_scale == 0.5 and exp.model.moe.block_config.uncertainty_coef == 0.1
    assert (exp.parallel.ep_size, exp.train.max_steps, exp.model.moe.num_experts) == (2, 7, 4)
    # The preset's S2MoE settings do not follow it to another block kind, which has none.
    assert preset("tiny", {"model": {"moe": {"block": "moe"}}}).model.moe.block_config is None
    with pytest.raises(ConfigError, match=r"moe\.block_config: block 'moe' has no settings"):
        preset("tiny", {"model": {"moe": {"block": "moe", "block_config": {"noise_scale": 0.5}}}})
    with pytest.raises(ConfigError, match=r"preset: must be one of 'tiny', 'paper-small'"):
        preset("huge")


ZERO2 = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize("change,field", [
    ({"train_micro_batch_size_per_gpu": "16"}, "train_micro_batch_size_per_gpu: must be a positive integer"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps: must be a positive integer"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping: must be a number >= 0"),
    ({"optimizer": {"type": "Adamm", "params": {"lr": 1e-3}}}, "optimizer.type: 'Adamm' is not an optimizer"),
    ({"train_micro_batch_size_per_gpu": None}, "train_micro_batch_size_per_gpu: the DeepSpeed config sets neither"),
])
def test_deepspeed_config_mistakes_are_named_before_deepspeed_sees_them(change, field):
    """Each of these used to die inside deepspeed.initialize with a traceback, after the data was prepared."""
    from s2moe_ds.parallel import check_ds_config
    cfg = {k: v for k, v in {**ZERO2, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(".", r"\.")):
        check_ds_config(cfg)
    check_ds_config(ZERO2)


def test_an_inconsistent_train_batch_size_is_named_with_the_world_size():
    from s2moe_ds.parallel import check_ds_batch
    with pytest.raises(ConfigError, match=r"train_batch_size: 48 is not .* 16 x .* 1 x 2 ranks = 32"):
        check_ds_batch({**ZERO2, "train_batch_size": 48}, 2)
    with pytest.raises(ConfigError, match=r"train_batch_size: 44 is not a multiple of gradient_accumulation_steps 1 x 3"):
        check_ds_batch({"train_batch_size": 44, "gradient_accumulation_steps": 1}, 3)
    check_ds_batch({**ZERO2, "train_batch_size": 32}, 2)
    check_ds_batch({"train_batch_size": 44, "gradient_accumulation_steps": 1}, 2)
