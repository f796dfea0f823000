"""The loss-free router's bias in training, on 2 gloo processes with expert parallelism 2 and 2
accumulation steps, under S2MoE: each step moves it from the loads of every micro-batch
on every rank, so it is the same on both ranks although their data differ; a run stopped and
resumed across its updates ends with bit-identical weights and bias; it costs the step one
collective more (the loads' all-reduce), no host read; and a checkpoint resumes on another layout
with its bias."""

import pytest
import torch

from ..harness import run_distributed
from ..runs import TEXT, _ds_config, _experiment
from .test_host_syncs import HostSyncCounter, plain_steps

RATE = 0.05
STEPS = 4


def _worker(rank, world_size, text, out_dir, cache, block):
    from s2moe_ds.moe import expert_blocks
    from s2moe_ds.train import TrainerHook, model_preset, pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32,
                         moe=dict(num_experts=4, block=block, router="lossfree",
                                  router_config=dict(lossfree_bias_rate=RATE)))

    class Probe(TrainerHook):
        """This rank's loads of every micro-batch, the bias after every step, the final state."""

        def __init__(self):
            self.loads, self.biases, self.state = {}, {}, None

        def after_forward(self, trainer, step, out):
            counts = [out.layer_metrics[f"layer{i}/expert_counts"] for i in range(len(self._routers(trainer)))]
            self.loads.setdefault(step, []).append(torch.stack(counts).clone())

        def on_step_end(self, trainer, step):  # after the trainer's own hooks: the updated bias
            self.biases[step] = torch.stack([r.selection_bias for r in self._routers(trainer)]).clone()
            self.state = {n: t.detach().clone() for n, t in trainer.engine.module.state_dict().items()}

        @staticmethod
        def _routers(trainer):
            return [b.router for b in expert_blocks(trainer.engine.module)]

    def run(name, counter=None, **train):
        probe = Probe()
        experiment = _experiment(model, world_size, text, cache, out_dir=f"{out_dir}/{name}", seq_len=32,
                                 warmup_steps=1, max_steps=STEPS, eval_interval=STEPS, save_interval=2,
                                 log_interval=10**6, **train)
        hooks = [probe] + ([counter] if counter is not None else [])
        final = pretrain(experiment, _ds_config(stage=2), hooks=hooks)
        return final, probe

    with HostSyncCounter() as counter:
        straight, probe = run("straight", counter)
    first, probe1 = run("resumed", stop_after=3)
    second, probe2 = run("resumed", resume=True)
    return {"loads": probe.loads, "biases": probe.biases, "state": probe.state,
            "resumed_biases": {**probe1.biases, **probe2.biases}, "resumed_state": probe2.state,
            "losses": straight["losses"], "resumed_losses": first["losses"] + second["losses"],
            "syncs": plain_steps(counter.counts, STEPS)}


# Under S2MoE, whose loads count both paths; the plain block's resume is test_routers.py's.
@pytest.mark.parametrize("block", ["s2moe"])
def test_bias_follows_every_ranks_loads_stays_equal_across_ranks_and_resumes_bit_exactly(block, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    ranks = run_distributed(_worker, 2, (str(text), str(tmp_path), str(tmp_path / "cache"), block))
    a, b = ranks
    # The ranks route different tokens ...
    assert any(not torch.equal(x, y) for s in a["loads"] for x, y in zip(a["loads"][s], b["loads"][s]))
    # ... yet hold the same bias after every step: the step's loads summed over both ranks and both
    # micro-batches, each expert moved by RATE towards the mean load.
    expected, moved = torch.zeros_like(a["biases"][1]), False
    for step in range(1, STEPS + 1):
        assert len(a["loads"][step]) == 2  # gradient_accumulation_steps
        load_LE = sum(a["loads"][step]) + sum(b["loads"][step])
        routes = 32 * 4 * 2 * 2 * 2 * (2 if block == "s2moe" else 1)  # tokens x micro x ranks x k (x paths)
        assert int(load_LE[0].sum()) == routes
        mean_L1 = load_LE.double().mean(dim=1, keepdim=True)
        expected += (torch.sign(mean_L1 - load_LE.double()) * RATE).float()
        assert torch.equal(a["biases"][step], b["biases"][step]), step
        assert torch.equal(a["biases"][step], expected), (step, a["biases"][step], expected)
        moved |= bool(expected.abs().sum() > 0)
    assert moved  # at some step (it may come back to 0: +u, then -u)
    for r in ranks:
        # Stopped after step 3 and resumed: bit-identical losses, bias and weights (this rank's experts too).
        assert r["resumed_losses"] == r["losses"]
        assert all(torch.equal(r["resumed_biases"][s], r["biases"][s]) for s in r["biases"])
        assert r["resumed_state"].keys() == r["state"].keys()
        differ = [n for n in r["state"] if not torch.equal(r["resumed_state"][n], r["state"][n])]
        assert not differ, differ
        # One read a step, as for every run; the loads' all-reduce is the one collective it adds.
        for step, c in r["syncs"].items():
            assert c.get("reads", 0) <= 1 and c.get("collectives", 0) <= 2, (step, c)


def _layout_worker(rank, world_size, text, out_dir, cache, max_steps, resume):
    from s2moe_ds.moe import expert_blocks
    from s2moe_ds.train import TrainerHook, model_preset, pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32,
                         moe=dict(num_experts=4, block="moe", router="lossfree",
                                  router_config=dict(lossfree_bias_rate=RATE)))
    seen = {}

    class Biases(TrainerHook):
        def on_step_start(self, trainer, step):
            seen[("start", step)] = torch.stack([b.router.selection_bias for b in expert_blocks(trainer.engine.module)])

        def on_step_end(self, trainer, step):
            seen[("end", step)] = torch.stack([b.router.selection_bias for b in expert_blocks(trainer.engine.module)])

    experiment = _experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=32, warmup_steps=1,
                             max_steps=max_steps, eval_interval=0, save_interval=1, log_interval=10**6,
                             resume=resume)
    pretrain(experiment, _ds_config(stage=2), hooks=[Biases()])
    return {k: v.clone() for k, v in seen.items()}


def test_the_bias_is_resharded_with_the_model(tmp_path):
    """Saved by 2 ranks with ep_size 2 after step 1, resumed on 1 rank (ep_size 1): step 2 routes
    with the bias step 1 left, on a layout that never computed it."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    args = (str(text), str(tmp_path / "run"), str(tmp_path / "cache"))
    saved = run_distributed(_layout_worker, 2, (*args, 1, False))[0][("end", 1)]
    resumed = run_distributed(_layout_worker, 1, (*args, 2, True))[0]
    assert saved.abs().sum() > 0
    assert torch.equal(resumed[("start", 2)], saved)
    assert not torch.equal(resumed[("end", 2)], saved)  # and it goes on moving
