"""Bad settings fail at construction with an error that names the field."""

import pytest

from s2moe_ds.config import ConfigError, MoEConfig, S2MoEConfig
from s2moe_ds.moe import FFN, S2MoE


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
    (dict(num_experts=6, ep_size=4), "num_experts"),
    (dict(num_experts=0), "num_experts"),
    (dict(k=5, num_experts=4), "k"),
    (dict(k=0), "k"),
    (dict(eval_k=3, num_experts=2), "eval_k"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(min_capacity=-1), "min_capacity"),
    (dict(noisy_gate_policy="Gaussian"), "noisy_gate_policy"),
])
def test_routing_fields_are_validated_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=rf"moe\.{field}:"):
        MoEConfig(**kwargs)
    with pytest.raises(ConfigError, match=rf"{field}:"):
        S2MoE(8, FFN(8, 16), **{"num_experts": 4, **kwargs})


def test_router_and_coefficient_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match=r"moe\.router: must be one of 's2moe', 'smoe', 'dense'"):
        MoEConfig(router="xmoe")
    with pytest.raises(ConfigError, match=r"moe\.balance_coef: .*uncertainty_coef 0"):
        MoEConfig(balance_coef=0.0)
    MoEConfig(balance_coef=0.0, s2moe=S2MoEConfig(uncertainty_coef=0.0))  # consistent: accepted
    with pytest.raises(ConfigError, match=r"hidden_size:"):
        S2MoE(0, FFN(8, 16))
    with pytest.raises(ConfigError, match=r"expert: must be a torch.nn.Module"):
        S2MoE(8, lambda x: x)


def test_config_round_trips_through_a_dict():
    cfg = MoEConfig(num_experts=8, ep_size=2, s2moe=S2MoEConfig(noise_scale=0.5))
    again = MoEConfig(**cfg.to_dict())
    assert again == cfg and again.s2moe.noise_scale == 0.5 and again.resolved_eval_k == 2
