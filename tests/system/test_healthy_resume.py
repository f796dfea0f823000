"""No poisoned resume (issue 17): a non-finite or spiking loss sets aside the checkpoint whose
weights gave it, names the last healthy one (which pruning kept), and a resume from it with a
lower --lr trains on; --resume-step picks an earlier step and sets the later ones aside. (A NaN on
one rank: tests/system/test_pretrain.py.)"""

import os

import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.train import TrainConfig, TrainerHook

from ..harness import run_distributed
from .test_pretrain import TEXT, _pretrain_worker, damaged_loss_task


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _listing(ckpt_dir):
    return sorted(d for d in os.listdir(ckpt_dir) if "step" in d)


class _Rates(TrainerHook):
    """The learning rate each step's optimizer update runs at."""

    def __init__(self):
        self.seen = {}

    def on_step_start(self, trainer, step):
        self.seen[step] = trainer.engine.get_lr()[0]


def _exploding_lr_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.checkpoint import latest_tag
    from s2moe_ds.train import UnhealthyLossError
    ckpt = os.path.join(out_dir, "checkpoints")
    # keep_checkpoints 1: the step-1 checkpoint survives only because pruning keeps the last healthy one.
    kw = dict(max_steps=6, save_interval=1, keep_checkpoints=1, eval_interval=0)
    with pytest.raises(UnhealthyLossError) as info:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(kw, lr=1e6))
    after_failure = (_listing(ckpt), latest_tag(ckpt))
    rates = _Rates()
    resumed = _pretrain_worker(rank, world_size, text, out_dir, cache, dict(kw, lr=1e-3, resume=True), hooks=[rates])
    lrs = rates.seen
    # An earlier step by name: its continuation is recomputed exactly; the later checkpoint is set aside.
    again = _pretrain_worker(rank, world_size, text, out_dir, cache, dict(kw, lr=1e-3, resume_step=5))
    with pytest.raises(ConfigError) as missing:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(kw, lr=1e-3, resume_step=3))
    return dict(message=str(info.value), after_failure=after_failure, resumed=resumed, lrs=lrs, again=again,
                final=(_listing(ckpt), latest_tag(ckpt)), missing=str(missing.value))


def test_exploding_learning_rate_resumes_from_the_last_healthy_step(text_file, tmp_path):
    out = tmp_path / "run"
    results = run_distributed(_exploding_lr_worker, 2, (text_file, str(out), str(tmp_path / "cache")))
    r = results[0]
    failed_at = int(r["message"].split(" at step ")[1].split(":")[0])
    bad, healthy = f"step{failed_at - 1:08d}", f"step{failed_at - 2:08d}"
    # Here the loss first jumps to ~1e12 (a spike), then becomes NaN a step later: with the spike
    # check off, the step before the NaN would count as healthy and its resume fail again.
    assert r["message"].startswith((f"loss spike at step {failed_at}: total=",
                                    f"non-finite loss at step {failed_at}: total="))
    assert f"the checkpoint of step {failed_at - 1}, whose weights gave it, is set aside as " in r["message"]
    assert f"the last healthy checkpoint is {out / 'checkpoints' / healthy} (step {failed_at - 2})" in r["message"]
    assert "resume with a lower --lr" in r["message"]
    # Set aside, not deleted; `latest` names the healthy one, which keep_checkpoints=1 did not prune.
    assert r["after_failure"] == ([f"poisoned_{bad}", healthy], healthy)
    for rank in range(2):
        losses = results[rank]["resumed"]["losses"]
        assert results[rank]["resumed"]["step"] == 6 and len(losses) == 6 - (failed_at - 2)
        assert all(loss == loss and loss < 10 for loss in losses), losses
    # The resumed steps run at the new --lr from the first one on (DeepSpeed alone would take one
    # step at the rate saved with the optimizer).
    first = failed_at - 1
    assert 0 < r["lrs"][first] <= 1e-3 and max(r["lrs"][s] for s in range(first, 7)) <= 1e-3, r["lrs"]
    # --resume-step 5 recomputes step 6 exactly and sets the run's own step-6 checkpoint aside.
    for rank in range(2):
        assert results[rank]["again"]["losses"] == pytest.approx(results[rank]["resumed"]["losses"][-1:], abs=1e-6)
    assert r["final"] == ([f"poisoned_{bad}", "step00000005", "step00000006", "superseded_step00000006"],
                          "step00000006")
    assert "holds no complete checkpoint of step 3 (complete steps: 5, 6)" in r["missing"]


def _spike_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.train import LossSpikeError
    task = damaged_loss_task(text, cache, rank, damaged_rank=0, factor=100)  # step 5: 100x the loss on rank 0
    with pytest.raises(LossSpikeError) as info:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=6, save_interval=2), task=task)
    return str(info.value)


def test_a_loss_spike_stops_every_rank_and_sets_its_checkpoint_aside(text_file, tmp_path):
    out = tmp_path / "run"
    messages = run_distributed(_spike_worker, 2, (text_file, str(out), str(tmp_path / "cache")))
    assert messages[0].startswith("loss spike at step 5: total=") and " above 10.0 x " in messages[0]
    assert messages[1].startswith("loss spike at step 5: on another rank (here total=")
    for message in messages:
        assert "the checkpoint of step 4, whose weights gave it, is set aside" in message
        assert f"the last healthy checkpoint is {out / 'checkpoints' / 'step00000002'} (step 2)" in message
    assert _listing(out / "checkpoints") == ["poisoned_step00000004", "step00000002"]


@pytest.mark.parametrize("field, value, expected", [
    ("spike_factor", 0.5, "train.spike_factor: must be 0 (off) or above 1"),
    ("spike_window", 0, "train.spike_window"),
    ("resume_step", 0, "train.resume_step"),
])
def test_bad_spike_and_resume_step_settings_are_named(field, value, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**{field: value})


def test_resume_step_implies_resume():
    assert TrainConfig(resume_step=4).resume is True
