"""Pretraining end to end on a small local text: launcher run, exact resume, killed save, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from s2moe_ds.config import ConfigError
from s2moe_ds.parallel import ParallelConfig, free_port
from s2moe_ds.train import ExperimentConfig, TrainConfig, TrainerHook, model_preset

from ..harness import run_distributed
from ..runs import TEXT, _ds_config, _experiment, _pretrain_worker, text_file  # noqa: F401 (text_file: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_resume_is_exact(text_file, tmp_path):
    cache = str(tmp_path / "cache")
    straight = run_distributed(_pretrain_worker, 2, (text_file, str(tmp_path / "a"), cache, dict(max_steps=6)))
    first = run_distributed(_pretrain_worker, 2,
                            (text_file, str(tmp_path / "b"), cache, dict(max_steps=6, stop_after=3)))
    second = run_distributed(_pretrain_worker, 2,
                             (text_file, str(tmp_path / "b"), cache, dict(max_steps=6, resume=True)))
    for rank in range(2):
        assert len(first[rank]["losses"]) == 3 and len(second[rank]["losses"]) == 3
        resumed = first[rank]["losses"] + second[rank]["losses"]
        assert max(abs(a - b) for a, b in zip(resumed, straight[rank]["losses"])) < 1e-6, (resumed, straight)
    assert second[0]["valid"]["bpc"] == pytest.approx(straight[0]["valid"]["bpc"], abs=1e-6)
    with open(tmp_path / "b" / "checkpoints" / "latest") as f:
        assert f.read().strip() == "step00000006"


class _SignalledDuringStep2(TrainerHook):
    """Rank 1 alone receives SIGTERM (preemption) during step 2, as a scheduler may signal the ranks
    at different times."""

    def __init__(self):
        self.stops = []

    def on_step_start(self, trainer, step):
        import signal
        if trainer.rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_stop_signal(self, trainer, step, reason):
        self.stops.append((step, reason))


def _preempted_worker(rank, world_size, text, out_dir, cache):
    hook = _SignalledDuringStep2()
    final = _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=6), hooks=[hook])
    return {**final, "hook_stops": hook.stops}


def test_sigterm_on_one_rank_checkpoints_every_rank_and_stops_for_requeue(text_file, tmp_path):
    from s2moe_ds.train import REQUEUE_MARKER
    out = tmp_path / "run"
    results = run_distributed(_preempted_worker, 2, (text_file, str(out), str(tmp_path / "cache")))
    assert [r["step"] for r in results] == [2, 2]
    assert results[1]["stopped_by"] == "SIGTERM" and results[0]["stopped_by"] == "another rank's signal"
    assert results[1]["hook_stops"] == [(2, "SIGTERM")] and results[0]["hook_stops"] == [(2, "another rank's signal")]
    # Step 2 is not a save interval (3): the signal forced the checkpoint, and it is complete.
    assert (out / "checkpoints" / "step00000002" / "COMPLETE").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert (out / REQUEUE_MARKER).read_text() == "another rank's signal at step 2\n"


class _KilledWhileSaving(TrainerHook):
    """Dies once DeepSpeed's files of step 6 are written, before COMPLETE and latest are."""

    def before_checkpoint_commit(self, trainer, step, path):
        if step == 6:
            for name in ("mp_rank_00_model_states.pt", f"rng_rank{trainer.rank}.pt", "meta.json", "tokenizer.json"):
                assert os.path.isfile(os.path.join(path, name)), name
            raise KeyboardInterrupt("killed while saving")


def _killed_save_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.checkpoint import latest_tag
    with pytest.raises(KeyboardInterrupt):
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=6), hooks=[_KilledWhileSaving()])
    assert latest_tag(os.path.join(out_dir, "checkpoints")) == "step00000003"
    # and the run resumes from it: steps 4-6 again
    return _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=6, resume=True))["losses"]


def test_killed_save_keeps_the_previous_checkpoint(text_file, tmp_path):
    losses = run_distributed(_killed_save_worker, 2, (text_file, str(tmp_path / "k"), str(tmp_path / "cache")))
    assert len(losses[0]) == 3
    entries = sorted(e for e in os.listdir(tmp_path / "k" / "checkpoints") if e == "latest" or e.startswith("step"))
    assert entries == ["latest", "step00000003", "step00000006"]


def _layout_error_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.train import pretrain
    experiment = _experiment(model_preset("tiny", moe=dict(num_experts=4)), 4, text, cache, out_dir=out_dir)
    with pytest.raises(ConfigError, match=r"parallel\.ep_size: 4 must divide the world size 2"):
        pretrain(experiment, _ds_config())
    return True


def test_layout_errors_name_the_field(text_file, tmp_path):
    assert run_distributed(_layout_error_worker, 2, (text_file, str(tmp_path / "e"), str(tmp_path / "c")))


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args,message", [
    (["--deepspeed_config", "ds_configs/zero2.json", "--num-experts", "6", "--ep-size", "4"], "moe.num_experts"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--noise-scale", "-1"], "s2moe.noise_scale"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--dataset", "path", "--path", "/no/such.txt"], "data.path"),
    (["--deepspeed_config", "/no/such.json"], "deepspeed_config: file not found"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--max-steps", "0"], "train.max_steps"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--block", "moe", "--noise-scale", "0.5"],
     "--noise-scale: is a setting of block 's2moe', but this run's moe.block is 'moe'"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--router", "smoe"], "moe.router: 'smoe' names a block kind"),
    (["--deepspeed_config", "ds_configs/zero2.json", "--max-seq-len", "32"], "train.seq_len: 64 exceeds model.max_seq_len 32"),
])
def test_cli_errors_name_the_field_before_any_compute(args, message):
    result = _cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


def test_a_deepspeed_config_mistake_is_named_before_the_data_is_read(text_file, tmp_path):
    with open(os.path.join(ROOT, "ds_configs", "zero2.json")) as f:
        cfg = json.load(f)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**cfg, "train_micro_batch_size_per_gpu": "16"}))
    result = _cli("--deepspeed_config", str(bad), "--dataset", "path", "--path", text_file, "--cache-dir",
                  str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2 and "train_micro_batch_size_per_gpu: must be a positive integer, got '16'" \
        in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "cache").exists()


def _deepspeed_launch(config, text_file, tmp_path, out, *flags, timeout=600, expect=0):
    """launch/pretrain.py under the deepspeed launcher: 2 CPU ranks, ep_size 2, a local text file."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
           os.path.join(ROOT, "ds_configs", config), "--ep-size", "2", "--dataset", "path", "--path", text_file,
           "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(out), "--seq-len", "32", *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_a_data_error_on_rank_0_stops_every_rank_with_status_2(tmp_path):
    """Rank 0 prepares the corpus while the others wait; its error used to leave them to the
    launcher, which reported status 1 or 2 depending on who died first."""
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("caf\u00e9 au lait " * 3000).encode("latin-1"))
    result = _deepspeed_launch("zero2.json", str(latin), tmp_path, tmp_path / "run", "--max-steps", "2",
                               timeout=300, expect=2)
    out = result.stdout + result.stderr
    assert out.count("is not UTF-8 text") >= 2, out[-3000:]  # every rank names the file


def test_deepspeed_launcher_end_to_end(text_file, tmp_path):
    out = tmp_path / "run"
    result = _deepspeed_launch("zero2.json", text_file, tmp_path, out, "--max-steps", "4", "--eval-interval", "2",
                               "--log-interval", "1")
    assert "tensorboard --logdir" in result.stdout
    ckpt = out / "checkpoints" / "step00000004"
    assert (ckpt / "COMPLETE").exists()
    assert len([f for f in os.listdir(ckpt) if "_expert_" in f]) == 2 * 4  # 2 MoE layers x 4 experts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/task_loss", "train/balance_loss", "train/uncertainty_loss", "train/lr",
                "train/grad_norm", "train/tokens_per_s", "train/step_ms", "valid/bpc", "moe/layer0/expert0_load",
                "moe/layer0/dropped_fraction", "moe/layer1/mix_gate_mean"):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    loads = [[e.value for e in events.Scalars(f"moe/layer0/expert{i}_load")] for i in range(4)]
    assert [sum(step) for step in zip(*loads)] == pytest.approx([1.0] * 4, abs=1e-5)
    assert "moe/layer0/mix_gate" in events.Tags()["histograms"]
    record = json.loads((out / "run_config.json").read_text())
    assert record["parallel"]["ep_size"] == 2 and record["world_size"] == 2


def _rank_average_worker(rank, world_size):
    from s2moe_ds.train.collectives import rank_average
    from s2moe_ds.train.monitor import layer_values, rank_averaged_keys
    counts = torch.tensor([2, 2, 0, 0]) if rank == 0 else torch.tensor([0, 1, 1, 2])  # shares .5 .5 0 0, 0 .25 .25 .5
    values = layer_values({"layer0/expert_counts": counts, "layer0/dropped_fraction": torch.tensor(0.1 * rank),
                           "layer0/mix_gate": torch.full((3, ), float(rank))})
    return rank_average(values, rank_averaged_keys(values))


def test_logged_expert_load_is_every_ranks_not_rank_0s():
    results = run_distributed(_rank_average_worker, 2)
    for got in results:
        torch.testing.assert_close(got["layer0/expert_load"], torch.tensor([0.25, 0.375, 0.125, 0.25]))
        torch.testing.assert_close(got["layer0/dropped_fraction"], torch.tensor(0.05))
    # The mixing-gate values are a histogram sample: each rank keeps its own.
    assert [r["layer0/mix_gate"].tolist() for r in results] == [[0.0] * 3, [1.0] * 3]


def _consolidate_worker(rank, world_size, text, out_dir, cache, stage):
    from s2moe_ds.train import pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4))
    experiment = _experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=32, max_steps=3,
                             eval_interval=3, save_interval=3)
    return pretrain(experiment, _ds_config(stage))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_consolidated_checkpoint_reproduces_the_distributed_evaluation(stage, text_file, tmp_path):
    from s2moe_ds.data import DataConfig, eval_batches, prepare_corpus
    from s2moe_ds.eval import evaluate_split
    out = str(tmp_path / "run")
    cache = str(tmp_path / "cache")
    final = run_distributed(_consolidate_worker, 2, (text_file, out, cache, stage))[0]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "consolidate.py"), out, "--out",
                             str(tmp_path / "model.pt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # One file, no DeepSpeed engine, no process group: the ep_size-1 model of the same weights.
    from s2moe_ds.models import build_model, model_config_from_dict
    blob = torch.load(tmp_path / "model.pt", weights_only=False)
    model = build_model(model_config_from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    corpus = prepare_corpus(DataConfig(dataset="path", path=text_file, cache_dir=cache))
    single = evaluate_split(lambda x, y, m: model(x, y, m), eval_batches(corpus.splits["valid"], 32, 4, 0, 1), "cpu",
                            corpus.units["valid"], len(corpus.splits["valid"]), corpus.metric)
    assert single["bpc"] == pytest.approx(final["valid"]["bpc"], abs=1e-5)


def test_generate_samples_from_a_checkpoint(text_file, tmp_path):
    out = str(tmp_path / "run")
    run_distributed(_consolidate_worker, 2, (text_file, out, str(tmp_path / "cache"), 2))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "generate.py"), "--checkpoint", out,
                             "--prompt", "it was", "--max-new-tokens", "20"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval_k=1" in result.stdout and "it was" in result.stdout
    # A prompt shorter than DeepSpeed's min_capacity, with a character the tokenizer lacks: it
    # samples, and says what it could not read.
    short = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "generate.py"), "--checkpoint", out,
                            "--prompt", "i\u00fc", "--max-new-tokens", "5", "--eval-k", "2"], capture_output=True,
                           text=True, timeout=300)
    assert short.returncode == 0, short.stderr[-3000:]
    assert "'\u00fc' not in the tokenizer's vocabulary" in short.stderr and "eval_k=2" in short.stdout


def _relayout_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.train import pretrain
    train = dict(out_dir=out_dir, seq_len=32, max_steps=2, eval_interval=0, save_interval=2)
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32)
    # ZeRO 0 keeps no optimizer shards to re-lay out (ZeRO 1 and 2 do: tests/system/test_reshard.py).
    pretrain(_experiment(model, 2, text, cache, **train), _ds_config(stage=0))
    with pytest.raises(ConfigError, match=r"--resume: .* ep_size=2, this run has ep_size=1, and the DeepSpeed "
                                          r"config's ZeRO stage is 0.*same world size, ep_size and model"):
        pretrain(_experiment(model, 1, text, cache, **train, resume=True), _ds_config(stage=0))
    with pytest.raises(ConfigError, match=r"train\.out_dir: .* already holds checkpoints; pass --resume"):
        pretrain(_experiment(model, 2, text, cache, **train), _ds_config(stage=0))
    return True


def test_resume_with_another_expert_parallel_layout_is_refused(text_file, tmp_path):
    assert run_distributed(_relayout_worker, 2, (text_file, str(tmp_path / "r"), str(tmp_path / "cache")))


def damaged_loss_task(text, cache, rank, damaged_rank, factor, call=9):
    """The language-modelling task whose `call`-th forward (9: step 5's first micro-batch, with 2
    accumulation steps) gives a task loss times `factor`, on `damaged_rank` only."""
    from s2moe_ds.data import DataConfig
    from s2moe_ds.train import LanguageModelingTask

    class DamagedTask(LanguageModelingTask):
        calls = 0

        def forward(self, engine, batch):
            out = super().forward(engine, batch)
            DamagedTask.calls += 1
            if DamagedTask.calls == call and rank == damaged_rank:
                out.task_loss = out.task_loss * factor
            return out

    return DamagedTask(DataConfig(dataset="path", path=text, cache_dir=cache), seq_len=32)


def _non_finite_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.checkpoint import latest_tag
    from s2moe_ds.train import NonFiniteLossError

    task = damaged_loss_task(text, cache, rank, damaged_rank=1, factor=float("nan"))
    with pytest.raises(NonFiniteLossError) as info:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=6), task=task)
    assert latest_tag(os.path.join(out_dir, "checkpoints")) == "step00000003"
    return str(info.value)


def test_non_finite_loss_stops_every_rank_and_keeps_the_checkpoint(text_file, tmp_path):
    messages = run_distributed(_non_finite_worker, 2, (text_file, str(tmp_path / "n"), str(tmp_path / "cache")))
    assert "non-finite loss at step 5" in messages[0] and "task=" in messages[1] and "uncertainty=" in messages[0]
    assert "task=nan" in messages[1]
    assert not (tmp_path / "n" / "checkpoints" / "step00000006").exists()


def test_cpu_optimizer_offload_config_trains(text_file, tmp_path):
    """ds_configs/zero2_offload.json: ZeRO-2 with DeepSpeedCPUAdam (JIT-built on first use)."""
    out = tmp_path / "off"
    result = _deepspeed_launch("zero2_offload.json", text_file, tmp_path, out, "--max-steps", "3",
                               "--eval-interval", "3", timeout=900)
    assert "DeepSpeedCPUAdam" in result.stdout + result.stderr
    assert (out / "checkpoints" / "step00000003" / "COMPLETE").exists()


def _resume_rules_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.train import pretrain
    train = dict(out_dir=out_dir, seq_len=32, max_steps=3, eval_interval=0, save_interval=2)
    model = dict(d_model=32, d_inner=64, max_seq_len=32)
    pretrain(_experiment(model_preset("tiny", **model), 2, text, cache, **train, stop_after=2), _ds_config())
    # A model change is refused naming the field that changed ...
    with pytest.raises(ConfigError, match=r"another model config \(moe\.block_config\.noise_scale: 1\.0 -> 0\.5\)"):
        pretrain(_experiment(model_preset("tiny", **model, moe=dict(block_config=dict(noise_scale=0.5))), 2, text,
                             cache, **train, resume=True), _ds_config())
    # ... while an implementation switch (the same values computed another way) resumes.
    return pretrain(_experiment(model_preset("tiny", **model, moe=dict(block_config=dict(fused=False))), 2, text,
                                cache, **train, resume=True), _ds_config())["step"]


def test_resume_names_a_changed_model_field_and_accepts_an_implementation_switch(text_file, tmp_path):
    assert run_distributed(_resume_rules_worker, 2, (text_file, str(tmp_path / "r"), str(tmp_path / "cache"))) == [3, 3]
