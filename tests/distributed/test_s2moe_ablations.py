"""Issue 28's S2MoE ablations on 2 gloo ranks through the trainer: a ZeRO-2 run stopped and resumed
is the uninterrupted run, for the lite form and for a fixed gate without the batch-mean shift
(ep 2 == ep 1 with gradients is in test_expert_parallel.py)."""

import pytest

from ..harness import run_distributed

ABLATIONS = {"lite": dict(noisy_dispatch=False), "fixed-gate-no-shift": dict(mix_gate_fixed=0.5, noise_shift=False)}


def _resume_worker(rank, world_size, text, out_dir, cache, block_config):
    from s2moe_ds.train import model_preset, pretrain
    from ..runs import _ds_config, _experiment
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32,
                         moe=dict(num_experts=4, block="s2moe", block_config=block_config))

    def run(name, **train):
        return pretrain(_experiment(model, world_size, text, cache, out_dir=f"{out_dir}/{name}", seq_len=32,
                                    warmup_steps=1, max_steps=4, eval_interval=4, save_interval=2, log_interval=1,
                                    **train), _ds_config(stage=2))

    straight = run("straight")
    first = run("resumed", stop_after=3)
    second = run("resumed", resume=True)
    return straight, first, second


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_zero2_checkpoint_resumes_exactly(name, tmp_path):
    from ..runs import TEXT
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    results = run_distributed(_resume_worker, 2, (str(text), str(tmp_path), str(tmp_path / "cache"), ABLATIONS[name]))
    for straight, first, second in results:
        resumed = first["losses"] + second["losses"]
        assert len(resumed) == 4
        assert max(abs(a - b) for a, b in zip(resumed, straight["losses"])) < 1e-6, (resumed, straight["losses"])
        assert second["valid"]["bpc"] == pytest.approx(straight["valid"]["bpc"], abs=1e-6)
