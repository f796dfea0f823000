"""The gradient norm that clipping uses and TensorBoard shows (issue 17): equal to one computed by
hand from every rank's gradients, each expert counted once, in every shipped configuration (ZeRO
0, 1, 2; fp32 and bf16) on 2 gloo ranks with ep_size 2."""

import pytest

from s2moe_ds.train import TrainerHook

from ..harness import run_distributed
from ..runs import TEXT, _ds_config, _experiment


class _Norm(TrainerHook):
    """The norm the engine reports after step 1; with `capture`, every rank's gradients as the
    optimizer is about to see them (ZeRO 0: DeepSpeed has all-reduced them), before any clipping;
    with `clipped` (ZeRO 0), the squares the optimizer update itself receives, after clipping."""

    def __init__(self, capture=False, clipped=False):
        self.capture, self.clipped = capture, clipped
        self.reported = self.squares = self.clipped_squares = None

    def on_step_start(self, trainer, step):
        from s2moe_ds.parallel import deepspeed_internals as ds
        engine = trainer.engine
        if step != 1:
            return
        if self.capture:
            original = engine.step

            def capturing_step(*args, **kwargs):
                if engine.is_gradient_accumulation_boundary():
                    self.squares = _squares(engine.module.parameters())
                return original(*args, **kwargs)
            engine.step = capturing_step
        if self.clipped:
            # fp32: the torch optimizer itself; bf16: DeepSpeed's wrapper steps it on fp32 copies.
            wrapper = engine.optimizer
            inner = getattr(wrapper, "optimizer", wrapper)
            pairs = ([(lp, hp) for lg, hg in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lg, hg)]
                     if hasattr(wrapper, "fp32_groups") else [(p, p) for p in engine.module.parameters()])
            original_step = inner.step

            def capturing_update(*args, **kwargs):
                self.clipped_squares = [(ds.is_expert_param(lp), hp.grad.double().pow(2).sum().item())
                                        for lp, hp in pairs if hp.grad is not None]
                return original_step(*args, **kwargs)
            inner.step = capturing_update

    def on_step_end(self, trainer, step):
        if step == 1:
            norm = trainer.engine.get_global_grad_norm()
            self.reported = None if norm is None else float(norm)


def _squares(params):
    from s2moe_ds.parallel import deepspeed_internals as ds
    return [(ds.is_expert_param(p), p.grad.double().pow(2).sum().item()) for p in params if p.grad is not None]


def _norm_of(squares, world_size):
    """Shared gradients are the same on every rank; each rank's experts are its own (ep_size 2 = world)."""
    import deepspeed.comm as dist
    shared = sum(sq for expert, sq in squares if not expert)
    experts = [None] * world_size
    dist.all_gather_object(experts, sum(sq for expert, sq in squares if expert))
    return (shared + sum(experts)) ** 0.5, shared ** 0.5


def _norm_worker(rank, world_size, text, root, cache):
    from s2moe_ds.train import model_preset, pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4))

    def run(name, stage, bf16, clipping, hook):
        cfg = dict(_ds_config(stage), gradient_clipping=clipping, bf16={"enabled": bf16})
        pretrain(_experiment(model, world_size, text, cache, out_dir=f"{root}/{name}", seq_len=32, max_steps=1,
                             eval_interval=0, save_interval=0, log_interval=1), cfg, hooks=[hook])
        return hook

    true_norm, shared_only = _norm_of(run("hand", 0, False, 0.0, _Norm(capture=True)).squares, world_size)
    reported, clipped = {}, {}
    for stage in (0, 1, 2):
        for bf16 in (False, True):
            hook = run(f"z{stage}{'b' if bf16 else 'f'}", stage, bf16, 1.0, _Norm(clipped=stage == 0))
            reported[stage, bf16] = hook.reported
            if stage == 0:
                clipped[bf16] = _norm_of(hook.clipped_squares, world_size)[0]
    return dict(true=true_norm, shared_only=shared_only, reported=reported, clipped=clipped)


def test_gradient_norm_counts_every_expert_once_in_every_configuration(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    results = run_distributed(_norm_worker, 2, (str(tmp_path / "corpus.txt"), str(tmp_path), str(tmp_path / "cache")),
                              timeout=600)
    r = results[0]
    assert r["true"] > r["shared_only"] * 1.01  # the experts' share is not negligible here
    for (stage, bf16), norm in r["reported"].items():
        assert norm is not None, f"ZeRO {stage} {'bf16' if bf16 else 'fp32'}: no norm reported"
        assert norm == pytest.approx(r["true"], rel=3e-3 if bf16 else 1e-5), (stage, bf16, r)
    assert results[1]["reported"] == r["reported"]
    # ZeRO 0 clips with that norm: the update receives gradients of norm gradient_clipping (1.0).
    assert r["true"] > 1.0
    assert r["clipped"][False] == pytest.approx(1.0, rel=1e-5) and r["clipped"][True] == pytest.approx(1.0, rel=3e-3)
