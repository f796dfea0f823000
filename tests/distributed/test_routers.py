"""The baselines' routers (X-MoE, StableMoE, SMoE-Dropout): the behaviour that defines each method,
and, plain and under S2MoE, what every router must keep: ep_size 2 equals ep_size 1 with gradients,
the same all-to-all pair as SMoE, ZeRO-2 checkpoints that resume exactly (across StableMoE's switch
and SMoE-Dropout's schedule)."""

import pytest
import torch

from s2moe_ds.moe import FFN, MoEConfig, build_block
from s2moe_ds.moe.routers.smoe_dropout import scheduled_k
from s2moe_ds.moe.spec import ModelContext
from s2moe_ds.parallel import ExpertLayout

from ..harness import counting_all_to_all, run_distributed
from ..runs import ROUTER_SETTINGS

D, E, V, T = 8, 4, 11, 24


def _block(router, block="moe", ep_size=1, k=2, **router_config):
    cfg = MoEConfig(num_experts=E, k=k, block=block, router=router,
                    router_config={**ROUTER_SETTINGS[router], **router_config})
    return build_block(cfg, block, D, FFN(D, 16), ep_size, ModelContext(vocab_size=V))


def _routes(router, x_TD, ids_T=None):
    """[K, T] expert of every route the router picks for x (in its current mode; -1 where
    capacity dropped it), with the same draws of DeepSpeed's training randomness every call."""
    torch.manual_seed(1)
    return router.route(x_TD, ids_T).expert_ids_TK.t().clone()


# ------------------------------------------------------------------------------------------- X-MoE


@pytest.mark.parametrize("block", ["moe", "s2moe"])
def test_xmoe_scores_ignore_the_tokens_scale_and_stay_below_one_over_tau(block):
    torch.manual_seed(0)
    layer = _block("xmoe", block)
    router = layer.router
    x_TD = torch.randn(T, D)
    logits_TE = router.route_logits(x_TD)
    torch.testing.assert_close(router.route_logits(3.7 * x_TD), logits_TE)
    tau = router.log_temperature.exp().item()
    assert tau == pytest.approx(0.07)
    assert logits_TE.abs().max().item() <= 1 / tau + 1e-4
    # The temperature, the projection and the expert embeddings all learn.
    layer.train()
    parts = layer.forward_parts(x_TD.requires_grad_())
    (parts.output.square().sum() + parts.losses["balance"]).backward()
    for name in ("projection.weight", "centroids", "log_temperature"):
        param = dict(router.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_xmoe_sister_variant_rescales_the_expert_embeddings_and_has_no_temperature():
    torch.manual_seed(0)
    router = _block("xmoe", xmoe_sister=True, xmoe_dim=8).router
    assert "log_temperature" in dict(router.named_parameters())  # learned, but the scores never read it
    x_TD = torch.randn(T, D)
    logits_TE = router.route_logits(x_TD)
    torch.testing.assert_close(router.centroids.norm(dim=1), torch.full((E,), 1.5))
    # Unnormalised projections: the score grows with the token.
    torch.testing.assert_close(router.route_logits(2 * x_TD), 2 * logits_TE)


# --------------------------------------------------------------------------------------- StableMoE


def test_stablemoe_stage2_routes_by_token_id_through_a_frozen_table():
    torch.manual_seed(0)
    layer = _block("stablemoe", k=1)
    router = layer.router
    ids_T = torch.randint(0, V, (T,))
    x1_TD, x2_TD = torch.randn(T, D), torch.randn(T, D)
    layer.train()
    # Stage 1: routes follow the hidden states, and the distilled router has a loss to learn from.
    assert not torch.equal(_routes(router, x1_TD, ids_T), _routes(router, x2_TD, ids_T))
    assert "distill" in layer.forward_parts(x1_TD, token_ids=ids_T).losses
    # The distillation learns the stage-1 choice of each token id.
    emb = torch.nn.Embedding(V, D)
    opt = torch.optim.Adam([p for n, p in router.named_parameters() if "distilled" in n or "token_embedding" in n], 0.05)
    all_ids = torch.arange(V)
    target = router.scores(emb(all_ids)).argmax(1)
    for _ in range(200):
        opt.zero_grad()
        layer.forward_parts(emb(all_ids).detach(), token_ids=all_ids).losses["distill"].backward()
        opt.step()
    distilled = router.distilled_centroids(router.token_embedding(all_ids)).argmax(1)
    assert (distilled == target).float().mean() == 1.0

    router.set_training_step(2, 10)
    assert not bool(router.frozen)  # the last step of stage 1
    router.set_training_step(3, 10)
    assert bool(router.frozen)
    table_VE = router.frozen_logits.clone()
    torch.testing.assert_close(table_VE, router.distilled_centroids(router.token_embedding.weight).detach())
    # Stage 2: the same token ids take the same experts whatever their hidden states ...
    routes = _routes(router, x1_TD, ids_T)
    assert torch.equal(routes, _routes(router, x2_TD, ids_T))
    kept = routes[0] >= 0
    assert torch.equal(routes[0][kept].long(), table_VE[ids_T].argmax(1)[kept])
    layer.eval()  # no capacity drops in eval: every token takes its table's expert
    assert torch.equal(_routes(router, x2_TD, ids_T)[0].long(), table_VE[ids_T].argmax(1))
    layer.train()
    assert "distill" not in layer.forward_parts(x1_TD, token_ids=ids_T).losses
    # ... and training on changes the combine weights but never the table.
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        parts = layer.forward_parts(x1_TD, token_ids=ids_T)
        (parts.output.square().sum() + parts.losses["balance"]).backward()
        opt.step()
    assert router.centroids.weight.grad.abs().sum() > 0
    torch.testing.assert_close(router.frozen_logits, table_VE)
    assert torch.equal(_routes(router, x1_TD, ids_T), routes)
    assert {"frozen_logits", "frozen"} <= set(router.state_dict())  # checkpoints carry the table


def test_stablemoe_balance_loss_lowers_the_scores_of_overloaded_experts_only_in_stage1():
    router = _block("stablemoe", k=1).router
    logits_TE = torch.zeros(8, E)
    logits_TE[:, 0] = 1.0
    logits_TE[:2, 1] = 2.0  # expert 0 takes 6 of 8 tokens, expert 1 its even share of 2, the others none
    logits_TE.requires_grad_()
    router.balance_loss(logits_TE, 1).backward()
    assert logits_TE.grad[2:, 0].min() > 0  # overloaded: gradient descent lowers its scores
    assert logits_TE.grad[:2, 1].abs().max() == 0
    assert logits_TE.grad[:, 2:].abs().max() == 0  # no token routed there: nothing to push
    router.freeze()
    assert router.balance_loss(logits_TE, 1).item() == 0


def test_stablemoe_refuses_to_route_without_token_ids():
    layer = _block("stablemoe", stablemoe_stage1_steps=0)
    layer.router.set_training_step(1, 10)
    with pytest.raises(Exception, match="router 'stablemoe': needs the token ids"):
        layer.forward_parts(torch.randn(T, D))


# ------------------------------------------------------------------------------------ SMoE-Dropout


def test_smoe_dropout_schedule_goes_from_k_to_every_expert():
    assert [scheduled_k(s, 4, 1, 4) for s in range(0, 6)] == [1, 1, 2, 3, 4, 4]
    assert scheduled_k(50, 100, 2, 16) == 9


@pytest.mark.parametrize("block", ["moe", "s2moe"])
def test_smoe_dropout_router_never_learns_while_k_follows_the_schedule(block):
    torch.manual_seed(0)
    layer = _block("smoe_dropout", block, k=1)
    router = layer.router
    start = router.linear.weight.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    x_TD = torch.randn(T, D)
    layer.train()
    seen = []
    for step in range(1, 5):
        router.set_training_step(step, 100)  # the config's 4 steps, not the run's 100
        seen.append(_routes(router, x_TD).shape[0])
        opt.zero_grad()
        parts = layer.forward_parts(x_TD)
        (parts.output.square().sum() + parts.losses["balance"]).backward()
        opt.step()
    assert seen == [1, 2, 3, 4]
    assert router.linear.weight.grad is None
    torch.testing.assert_close(router.linear.weight, start, rtol=0, atol=0)
    layer.eval()
    assert _routes(router, x_TD).shape[0] == 1  # evaluated with eval_k (moe.k here) whatever training reached


# ---------------------------------------------------------------------- every router, 2 gloo ranks

COMBOS = [(r, b) for r in ("xmoe", "stablemoe", "smoe_dropout", "lossfree") for b in ("moe", "s2moe")]


def _forward_backward(layer, x_TD, ids_T, seed):
    x_TD = x_TD.clone().requires_grad_()
    torch.manual_seed(seed)
    parts = layer.forward_parts(x_TD, token_ids=ids_T)
    (parts.output.square().sum() + sum(parts.losses.values())).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return parts.output.detach(), {n: v.detach() for n, v in parts.losses.items()}, x_TD.grad, grads


def _parity_worker(rank, world_size):
    import deepspeed.comm as dist
    layout = ExpertLayout.from_process_groups(E, world_size)
    results = {}
    for router, block in [("topk", "moe")] + COMBOS:
        for stage in ((1, 2) if router == "stablemoe" else (1,)):
            torch.manual_seed(0)  # identical global weights on every rank
            ref, ep = _block(router, block), _block(router, block, ep_size=world_size)
            ep.load_state_dict({n: ref.state_dict()[layout.global_param_name(n)] for n in ep.state_dict()})
            for layer in (ref, ep):
                layer.set_deepspeed_parallelism()
                layer.train()
                if hasattr(layer.router, "set_training_step"):
                    layer.router.set_training_step(3 if stage == 2 else 1, 4)
            gen = torch.Generator().manual_seed(100 + rank)  # this rank's tokens
            x_TD, ids_T = torch.randn(T, D, generator=gen), torch.randint(0, V, (T,), generator=gen)
            r_out, r_losses, r_xgrad, r_grads = _forward_backward(ref, x_TD, ids_T, seed=7 + rank)
            with counting_all_to_all() as calls:
                e_out, e_losses, e_xgrad, e_grads = _forward_backward(ep, x_TD, ids_T, seed=7 + rank)
            name = f"{router}/{block}/stage{stage}"
            torch.testing.assert_close(e_out, r_out, rtol=1e-5, atol=1e-6, msg=name)
            assert set(e_losses) == set(r_losses), name
            for loss in r_losses:
                torch.testing.assert_close(e_losses[loss], r_losses[loss], msg=f"{name} {loss}")
            torch.testing.assert_close(e_xgrad, r_xgrad, rtol=1e-5, atol=1e-6, msg=name)
            for n in r_grads:  # an expert's gradient sums both ranks' tokens through the all-to-all
                if "experts" in n:
                    dist.all_reduce(r_grads[n])
            # Every trainable weight learns, but the distilled router once StableMoE froze routing.
            frozen = ("token_embedding", "distilled_centroids") if stage == 2 else ()
            assert set(e_grads) == {n for n, p in ep.named_parameters()
                                    if p.requires_grad and not any(f in n for f in frozen)}, name
            for n, g in e_grads.items():
                torch.testing.assert_close(g, r_grads[layout.global_param_name(n)], rtol=1e-5, atol=1e-5,
                                           msg=f"{name} {n}")
            results[name] = (calls["n"], sorted(e_losses))
    return results


def test_every_router_plain_and_under_s2moe_ep2_matches_ep1_with_one_all_to_all_pair():
    results = run_distributed(_parity_worker, world_size=2)[0]
    smoe_calls = results["topk/moe/stage1"][0]
    assert smoe_calls == 4  # dispatch and combine, forward and backward
    for name, (calls, losses) in results.items():
        assert calls == smoe_calls, (name, results)  # no router adds a collective, nor does the dual path
    assert "distill" in results["stablemoe/s2moe/stage1"][1]
    assert "uncertainty" in results["xmoe/s2moe/stage1"][1]


# ------------------------------------------------------------------ ZeRO-2 checkpoints, exact resume


def _resume_worker(rank, world_size, text, out_dir, cache, router, block):
    from s2moe_ds.moe import expert_blocks
    from s2moe_ds.train import TrainerHook, model_preset, pretrain
    from ..runs import _ds_config, _experiment
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32,
                         moe=dict(num_experts=4, block=block, router=router, router_config=ROUTER_SETTINGS[router]))

    class RouterState(TrainerHook):
        """Each step's schedule state of the first layer's router, as the step starts."""

        def __init__(self):
            self.seen = []

        def on_step_start(self, trainer, step):
            r = expert_blocks(trainer.engine.module)[0].router
            self.seen.append((r.k, bool(getattr(r, "frozen", False)),
                              float(r.frozen_logits.double().sum()) if hasattr(r, "frozen_logits") else None))

    def run(name, **train):
        hook = RouterState()
        result = pretrain(_experiment(model, world_size, text, cache, out_dir=f"{out_dir}/{name}", seq_len=32,
                                      warmup_steps=1, max_steps=4, eval_interval=4, save_interval=2, log_interval=1,
                                      **train), _ds_config(stage=2), hooks=[hook])
        return result, hook.seen

    straight = run("straight")
    first = run("resumed", stop_after=3)
    second = run("resumed", resume=True)
    return straight, first, second


@pytest.mark.parametrize("router,block", COMBOS, ids=[f"{r}-{b}" for r, b in COMBOS])
def test_zero2_checkpoint_resumes_exactly(router, block, tmp_path):
    """Stopped after step 3 and resumed for step 4: StableMoE switched at step 3, so step 4 must
    route with the table the checkpoint restored (a table frozen again from the distilled router,
    which weight decay moved since, would differ); SMoE-Dropout's k goes on from 3 to 4."""
    from ..runs import TEXT
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    results = run_distributed(_resume_worker, 2, (str(text), str(tmp_path), str(tmp_path / "cache"), router, block))
    for (straight, seen), (first, seen1), (second, seen2) in results:
        resumed = first["losses"] + second["losses"]
        assert len(resumed) == 4
        assert max(abs(a - b) for a, b in zip(resumed, straight["losses"])) < 1e-6, (resumed, straight["losses"])
        assert second["valid"]["bpc"] == pytest.approx(straight["valid"]["bpc"], abs=1e-6)
        assert seen1 + seen2 == seen
        if router == "smoe_dropout":
            assert [k for k, _, _ in seen] == [2, 3, 3, 4]  # moe.k 2 to every expert over 4 steps
        if router == "stablemoe":
            assert [frozen for _, frozen, _ in seen] == [False, False, True, True]


# ------------------------------------------------------------------------------ analysis and FLOPs


def _model(router, **router_config):
    from s2moe_ds.models import build_model
    from s2moe_ds.train import model_preset
    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=32, d_model=16, d_inner=32, max_seq_len=16,
                       moe=dict(num_experts=E, k=2, eval_k=1, router=router,
                                router_config={**ROUTER_SETTINGS[router], **router_config}))
    return build_model(cfg).eval()


@pytest.mark.parametrize("router", ["xmoe", "stablemoe", "smoe_dropout", "lossfree"])
def test_analysis_reads_each_routers_own_distribution(router):
    from s2moe_ds.moe import expert_blocks
    from ..unit.test_analysis import _analyse, _batches
    model = _model(router)
    if router == "stablemoe":
        for layer in expert_blocks(model):
            layer.router.freeze()
    batches = _batches(vocab=32)
    report = _analyse(model, batches)
    for layer, entry in zip(expert_blocks(model), report["layers"]):
        assert entry["router"] == router and sum(entry["top1_share"]) == pytest.approx(1.0)
        if router == "stablemoe":
            # Frozen: the analysed first choices are the table's, token by token.
            ids_T = torch.cat([x.reshape(-1)[m.reshape(-1) > 0] for x, m in batches])
            expected_E = torch.bincount(layer.router.frozen_logits[ids_T].argmax(1), minlength=E).double()
            assert entry["top1_share"] == pytest.approx((expected_E / expected_E.sum()).tolist())


def test_flops_count_each_routers_own_work():
    from s2moe_ds.eval.flops import flops_per_token
    d = 16
    router = {r: flops_per_token(_model(r).cfg, 16)["router"] for r in ("topk", "xmoe", "stablemoe")}
    layers = 2
    assert router["topk"] == layers * 2 * d * E
    assert router["xmoe"] == layers * (2 * d * 16 + 2 * 16 * E)  # projection to 16 dims, then E cosines
    assert router["stablemoe"] == layers * 2 * d * E  # in eval: the combine weights' scores (routing is a lookup)
    train = flops_per_token(_model("stablemoe").cfg, 16, training=True)["router"]
    assert train == 3 * 2 * layers * (2 * d * E + 2 * 50 * E)  # + the distilled router; 2 paths, fwd + bwd
