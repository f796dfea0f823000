"""What the tests that train share: a small corpus, DeepSpeed config, experiment and a 2-rank
pretraining worker (tests of every tier use them, so they live outside any tier's folder)."""

import pytest

from s2moe_ds.parallel import ParallelConfig
from s2moe_ds.train import ExperimentConfig, TrainConfig, model_preset

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of "
        "Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.\n") * 40


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def _ds_config(stage=2):
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**6,
    }


def _experiment(model, world_size, text, cache, **train_kw):
    from s2moe_ds.data import DataConfig
    return ExperimentConfig(model=model, parallel=ParallelConfig(ep_size=world_size), train=TrainConfig(**train_kw),
                            data=DataConfig(dataset="path", path=text, cache_dir=cache))


def _pretrain_worker(rank, world_size, text, out_dir, cache, train_kw, hooks=(), task=None):
    from s2moe_ds.train import pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, dropout=0.1, moe=dict(num_experts=4))
    train = dict(out_dir=out_dir, seq_len=32, warmup_steps=2, eval_interval=3, save_interval=3, log_interval=1)
    experiment = _experiment(model, world_size, text, cache, **{**train, **train_kw})
    return pretrain(experiment, _ds_config(), task=task, hooks=hooks)


ROUTER_SETTINGS = {
    "topk": {},
    "xmoe": {},
    "stablemoe": dict(stablemoe_stage1_steps=2),
    "smoe_dropout": dict(smoe_dropout_steps=4),
    "lossfree": dict(lossfree_bias_rate=0.05),
}
"""Every router with settings that give its state something to do within a few steps (a short
StableMoE stage 1, a short SMoE-Dropout schedule, a loss-free bias that moves enough to change
routes); the tests that cover every router use them."""
