"""The router z-loss (ST-MoE), an option of every router, plain and under S2MoE: its value, that
it is off (no term, nothing changed) at coefficient 0, how it enters the total loss, and its
setting's validation and flag."""

import math

import pytest
import torch

from s2moe_ds.cli import experiment_from_args, pretrain_parser
from s2moe_ds.config import ConfigError
from s2moe_ds.models import build_model
from s2moe_ds.moe import FFN, MoEConfig, build_block, total_loss
from s2moe_ds.moe.spec import ModelContext
from s2moe_ds.train import model_preset

from ..runs import ROUTER_SETTINGS as ROUTERS

D, E, V, T = 8, 4, 11, 24


def _block(router, block="moe", z_loss_coef=0.0, **moe):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, k=2, block=block, router=router, router_config=ROUTERS[router],
                    z_loss_coef=z_loss_coef, **moe)
    return build_block(cfg, block, D, FFN(D, 16), 1, ModelContext(vocab_size=V))


def _by_hand(scores_TE):
    """mean_t (log sum_e exp s_te)^2, written out."""
    return sum(math.log(sum(math.exp(s) for s in row)) ** 2 for row in scores_TE.tolist()) / len(scores_TE)


def _recording(router):
    """The router, with every Route it returns kept in the list returned."""
    seen, route = [], router.route
    router.route = lambda *args, **kwargs: seen.append(route(*args, **kwargs)) or seen[-1]
    return seen


@pytest.mark.parametrize("router", ROUTERS)
def test_z_loss_is_the_mean_squared_logsumexp_of_the_routers_scores_over_real_tokens(router):
    layer = _block(router, z_loss_coef=1e-3).train()
    x_TD, ids_T = torch.randn(T, D), torch.randint(0, V, (T,))
    route = layer.router.route(x_TD, ids_T)
    assert route.losses["z_loss"].dtype == torch.float32
    assert route.losses["z_loss"].item() == pytest.approx(_by_hand(route.scores_TE), rel=1e-5)
    # Padding stays out, as it does of the balance loss.
    mask_T = (torch.arange(T) % 3 != 0).float()
    route = layer.router.route(x_TD, ids_T, mask_T)
    assert route.losses["z_loss"].item() == pytest.approx(_by_hand(route.scores_TE[mask_T > 0]), rel=1e-5)
    # A training loss only: eval reports none.
    assert "z_loss" not in layer.eval().router.route(x_TD, ids_T).losses


@pytest.mark.parametrize("router", ROUTERS)
def test_under_s2moe_the_z_loss_covers_both_paths_as_the_balance_loss_does(router):
    layer = _block(router, "s2moe", z_loss_coef=1e-3).train()
    seen = _recording(layer.router)
    x_TD, ids_T = torch.randn(T, D), torch.randint(0, V, (T,))
    parts = layer.forward_parts(x_TD, token_ids=ids_T)
    (route,) = seen
    assert route.scores_TE.shape[0] == 2 * T  # the clean tokens and their noisy copies
    assert parts.losses["z_loss"].item() == pytest.approx(_by_hand(route.scores_TE), rel=1e-5)


@pytest.mark.parametrize("block", ["moe", "s2moe"])
def test_z_loss_trains_the_router(block):
    layer = _block("topk", block, z_loss_coef=1e-3).train()
    layer.forward_parts(torch.randn(T, D)).losses["z_loss"].backward()
    assert layer.router.wg.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("block", ["moe", "s2moe"])
@pytest.mark.parametrize("router", ROUTERS)
def test_coefficient_zero_adds_no_term_and_changes_nothing(router, block):
    assert "z_loss" not in MoEConfig(block=block, router=router, router_config=ROUTERS[router]).loss_terms()
    x_TD, ids_T = torch.randn(T, D), torch.randint(0, V, (T,))
    outputs = []
    for coef in (0.0, 1e-3):
        layer = _block(router, block, z_loss_coef=coef).train()
        torch.manual_seed(1)
        outputs.append(layer.forward_parts(x_TD, token_ids=ids_T))
    off, on = outputs
    assert "z_loss" not in off.losses and "z_loss" in on.losses
    torch.testing.assert_close(on.output, off.output, rtol=0, atol=0)
    for name, value in off.losses.items():
        torch.testing.assert_close(on.losses[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("over_layers", ["sum", "mean"])
def test_total_loss_adds_coef_times_the_layers_z_losses_reduced_as_the_balance_loss(over_layers):
    coef = 0.003
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", vocab_size=50, n_layer=3,
                                     moe=dict(z_loss_coef=coef, balance_over_layers=over_layers))).train()
    x = torch.randint(0, 50, (2, 16))
    out = model(x, x)
    per_layer = out.layer_losses
    assert len(per_layer["z_loss"]) == len(per_layer["balance"]) > 1  # every MoE layer reports it
    terms = model.cfg.moe.loss_terms()
    assert terms["z_loss"].coef == coef and terms["z_loss"].over_layers == over_layers
    total, reduced = total_loss(out.task_loss, per_layer, terms)
    reduce = (lambda v: torch.stack(v).sum()) if over_layers == "sum" else (lambda v: torch.stack(v).mean())
    z = reduce(per_layer["z_loss"])
    torch.testing.assert_close(reduced["z_loss"], z)
    torch.testing.assert_close(total, out.task_loss + 0.01 * reduce(per_layer["balance"])
                               + 0.1 * torch.stack(per_layer["uncertainty"]).mean() + coef * z)


@pytest.mark.parametrize("bad", [-1, -1e-9, float("nan"), float("inf"), "0.1", True])
def test_a_bad_coefficient_is_refused_naming_the_field_and_the_fix(bad):
    with pytest.raises(ConfigError, match=r"moe\.z_loss_coef: must be a finite number >= 0.*0 turns the router "
                                          r"z-loss off"):
        MoEConfig(z_loss_coef=bad)


def test_the_flag_sets_the_coefficient_and_rejects_a_negative_one():
    def parse(*argv):
        return experiment_from_args(pretrain_parser().parse_args(["--deepspeed_config", "x", *argv]))
    assert parse().model.moe.z_loss_coef == 0.0
    experiment = parse("--moe.z-loss-coef", "0.001", "--moe.router", "xmoe")
    assert experiment.model.moe.z_loss_coef == 0.001
    assert experiment.model.moe.loss_terms()["z_loss"].coef == 0.001
    with pytest.raises(ConfigError, match=r"moe\.z_loss_coef"):
        parse("--moe.z-loss-coef", "-1")
