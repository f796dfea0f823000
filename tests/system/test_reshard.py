"""Resume on another layout (checkpoint/reshard.py): a run of 2 ranks with ep_size 2 resumes on 1
rank (ep 1), on 4 ranks (ep 2 and ep 4), and across ZeRO 1 and 2. With dropout 0 and S2MoE's noise
deterministic, the first task loss after the reshard is the one the unchanged layout computes at
that step, and every global expert's weights and Adam moments arrive unchanged; with noise on, a
resumed run is reproducible from the checkpoint."""

import os
import re
import shutil

import pytest
import torch

from s2moe_ds.train import LanguageModelingTask, TrainerHook, model_preset

from ..harness import run_distributed
from .test_pretrain import TEXT, _experiment

GLOBAL_MICRO = 8  # micro-batch x world: the sampler's global batch, the same on every layout


class RecordingTask(LanguageModelingTask):
    """Language modelling that keeps each micro-batch's task loss (before the blocks' losses,
    which depend on how the batch is split)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.task_losses = []

    def loss(self, out, terms):
        self.task_losses.append(out.task_loss.item())
        return super().loss(out, terms)


class StateAtStart(TrainerHook):
    """Every global parameter's fp32 weight and Adam moments when the first step of this invocation starts."""

    def __init__(self):
        self.state, self.first = None, True

    def on_step_start(self, trainer, step):
        from s2moe_ds.checkpoint import reshard
        if self.first and trainer.step > 0:  # the first step of a resumed invocation
            self.state = reshard.engine_global_state(trainer.engine, trainer.layout)
        self.first = False


class ReshardReads:
    """What this rank's reshard read and kept: the files it read values from, the global ids of
    the experts in the module state it assembled, the optimizer values it copied, and the size of
    its own optimizer partitions (fp32 values)."""

    def __init__(self):
        from s2moe_ds.checkpoint import reshard
        from s2moe_ds.parallel import deepspeed_internals as ds
        self.files, self.experts, self.copied, self.own = [], [], None, None
        read, module_state = reshard.read_mapped, reshard.rank_module_state
        optimizer_share = reshard.load_optimizer_share

        def read_mapped(path):
            self.files.append(os.path.basename(path))
            return read(path)

        def rank_module_state(step_dir, layout):
            state = module_state(step_dir, layout)
            self.experts = sorted({int(m.group(1)) for m in map(EXPERT_KEY.search, state) if m})
            return state

        def load_optimizer_share(engine, *args):
            self.copied = optimizer_share(engine, *args)
            fragments = (ds.own_fragment(p, ()) for p in engine.module.parameters())
            self.own = sum(f[1] for f in fragments if f is not None)
            return self.copied

        reshard.read_mapped, reshard.rank_module_state = read_mapped, rank_module_state
        reshard.load_optimizer_share = load_optimizer_share
        reshard.CHUNK_VALUES = 1000  # the shards mapped in several batches per state, as a large model's are

    def record(self, layout):
        return {"files": self.files, "experts": self.experts, "copied": self.copied, "own": self.own,
                "global_ids": layout.global_ids()}


EXPERT_KEY = re.compile(r"deepspeed_experts\.(\d+)\.")


def _model(noise, block="s2moe"):
    moe = dict(block=block, num_experts=4, drop_tokens=False, router_config=dict(use_rts=False, top2_2nd_expert_sampling=False),
               block_config=dict(noise_scale=1.0 if noise else 0.0, noise_stats="global") if block == "s2moe" else None)
    return model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=moe)


def _worker(rank, world, text, out_dir, cache, ep, stage, train_kw, noise=False):
    from s2moe_ds.train import Trainer
    train_kw = dict(train_kw)
    micro = train_kw.pop("micro", GLOBAL_MICRO // world)
    block = train_kw.pop("block", "s2moe")
    ds_config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": train_kw.pop("gas", 1),
                 "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
                 "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}
    experiment = _experiment(_model(noise, block), ep, text, cache, out_dir=out_dir, seq_len=32, warmup_steps=1,
                             eval_interval=0, save_interval=2, max_steps=4, **train_kw)
    experiment.parallel.ep_size = ep
    task = RecordingTask(experiment.data, experiment.train.seq_len)
    hook = StateAtStart()
    reads = ReshardReads()
    trainer = Trainer(experiment, ds_config, task, [hook])
    final = trainer.run()
    from s2moe_ds.checkpoint import reshard
    end = reshard.engine_global_state(trainer.engine, trainer.layout) if train_kw.get("stop_after") and stage else None
    return {"task_losses": task.task_losses, "step": final["step"], "start_state": hook.state, "end_state": end,
            "gas": trainer.gas, "reads": reads.record(trainer.layout)}


def _run(world, text, out, cache, ep, stage=2, noise=False, **train_kw):
    return run_distributed(_worker, world, (text, str(out), cache, ep, stage, train_kw, noise), timeout=400)


def _merged(states):
    out = {}
    for s in states:
        out.update(s)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    (root / "corpus.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def saved(corpus):
    """2 ranks, ep_size 2, ZeRO 2: 4 steps straight, and the same run stopped at step 2."""
    text, cache = str(corpus / "corpus.txt"), str(corpus / "cache")
    straight = _run(2, text, corpus / "straight", cache, 2)
    stopped = _run(2, text, corpus / "stopped", cache, 2, stop_after=2)
    return straight, stopped


@pytest.mark.parametrize("world,ep,stage", [(1, 1, 2), (1, 1, 1), (4, 2, 2), (4, 4, 1)])
def test_resume_on_another_layout_continues_the_run(corpus, saved, tmp_path, world, ep, stage):
    straight, stopped = saved
    out = tmp_path / "run"
    shutil.copytree(corpus / "stopped", out)
    resumed = _run(world, str(corpus / "corpus.txt"), out, str(corpus / "cache"), ep, stage, resume=True)
    assert all(r["step"] == 4 for r in resumed)
    # Step 3's task loss: the mean over the ranks' equal shares of the same global batch. (Later
    # steps differ a little: S2MoE's InfoNCE draws its tokens per rank, and the balance loss is
    # taken per rank; test_the_global_batch_is_kept_by_gradient_accumulation follows SMoE further.)
    expected = sum(r["task_losses"][2] for r in straight) / len(straight)
    got = sum(r["task_losses"][0] for r in resumed) / len(resumed)
    assert got == pytest.approx(expected, abs=1e-5)
    before, after = _merged(r["end_state"] for r in stopped), _merged(r["start_state"] for r in resumed)
    assert set(before) == set(after) and any("deepspeed_experts.3." in k for k in after)
    for name in before:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(after[name][key], before[name][key], rtol=0, atol=0, msg=f"{name} {key}")
    _assert_each_rank_read_its_share(out / "checkpoints" / "step00000002", [r["reads"] for r in resumed],
                                     sum(v["fp32"].numel() for v in before.values()), ep)


def _assert_each_rank_read_its_share(step_dir, reads, parameters, ep):
    """Each rank read the values of its own experts' files only (of 4 experts, 4 / ep_size), kept
    no other expert, and copied exactly its own partitions' share of the saved optimizer states:
    over all ranks, each value of the model's fp32 weights and both moments once."""
    from s2moe_ds.checkpoint.reshard import EXPERT_FILE
    expert_files = {name: int(EXPERT_FILE.fullmatch(name).group(1)) for name in os.listdir(step_dir)
                    if EXPERT_FILE.fullmatch(name)}
    assert set(expert_files.values()) == {0, 1, 2, 3}
    for r in reads:
        own = r["global_ids"]
        assert len(own) == 4 // ep and r["experts"] == own
        read_experts = sorted(f for f in r["files"] if f in expert_files)
        assert read_experts == sorted(f for f, e in expert_files.items() if e in own)
        assert any(f.startswith("zero_pp_rank_") for f in r["files"])
        assert r["copied"] == 3 * r["own"]
    assert sum(r["own"] for r in reads) == parameters


def test_the_global_batch_is_kept_by_gradient_accumulation(corpus, tmp_path):
    """The saved run's DeepSpeed config (micro batch 4 on each of 2 ranks) resumed on 1 rank: 2
    accumulation steps make the same global batch of the same windows, so each optimizer step's
    mean task loss is the unchanged layout's, the second one too (the first step's update, its
    learning rate included, was the same); on 4 ranks micro batch 4 cannot make 8, refused.
    SMoE here: S2MoE's noise takes its mean and spread over each micro-batch (docs/method.md),
    which accumulation halves, so its losses agree only closely."""
    text, cache = str(corpus / "corpus.txt"), str(corpus / "cache")
    straight = _run(2, text, tmp_path / "straight", cache, 2, block="moe")
    out = tmp_path / "run"
    _run(2, text, out, cache, 2, block="moe", stop_after=2)
    shutil.copytree(out, tmp_path / "stopped")
    resumed = _run(1, text, out, cache, 1, micro=GLOBAL_MICRO // 2, block="moe", resume=True)[0]
    assert resumed["step"] == 4 and resumed["gas"] == 2 and len(resumed["task_losses"]) == 4
    for step in (2, 3):  # 0-based steps 3 and 4 of the run: two micro steps each after the reshard
        expected = sum(r["task_losses"][step] for r in straight) / len(straight)
        got = sum(resumed["task_losses"][2 * (step - 2):2 * (step - 2) + 2]) / 2
        assert got == pytest.approx(expected, abs=1e-5), (step, got, expected)
    with pytest.raises(Exception, match=r"train_micro_batch_size_per_gpu: .*global batch of 8.*\[1, 2\]"):
        _run(4, text, tmp_path / "stopped", cache, 2, micro=GLOBAL_MICRO // 2, block="moe", resume=True)


def test_with_noise_a_resumed_run_is_reproducible(corpus, tmp_path):
    text, cache = str(corpus / "corpus.txt"), str(corpus / "cache")
    _run(2, text, tmp_path / "noisy", cache, 2, noise=True, stop_after=2)
    runs = []
    for name in ("a", "b"):
        shutil.copytree(tmp_path / "noisy", tmp_path / name)
        runs.append(_run(1, text, tmp_path / name, cache, 1, noise=True, resume=True)[0]["task_losses"])
    assert runs[0] == runs[1] and len(runs[0]) == 2


def test_what_cannot_change_layout_is_refused_before_compute(corpus, tmp_path):
    text, cache = str(corpus / "corpus.txt"), str(corpus / "cache")
    _run(2, text, tmp_path / "z0", cache, 2, stage=0, stop_after=2)
    with pytest.raises(Exception, match="ZeRO stage is 0"):
        _run(1, text, tmp_path / "z0", cache, 1, stage=0, resume=True)
