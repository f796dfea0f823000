"""The trainer's seams: hooks in every phase, a router and a backbone added from outside the
package (a class plus a registry line each), a router that schedules itself per step, and a
backbone whose state the trainer carries from one forward to the next."""

import json
import os

import pytest

from s2moe_ds.models import BACKBONES, GPT, ModelConfig
from s2moe_ds.models.registry import BackboneSpec
from s2moe_ds.moe import ROUTERS, TopKRouter
from s2moe_ds.moe.routing import Routing
from s2moe_ds.moe.spec import RouterSpec
from s2moe_ds.train import TrainerHook

from ..harness import run_distributed
from ..runs import TEXT, _ds_config, _experiment


class StepCountingRouter(TopKRouter):
    """DeepSpeed's top-k routing that sees the training step, as a k schedule or a frozen stage would."""

    kind = "step-counting"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def set_training_step(self, step: int, max_steps: int) -> None:
        self.steps.append((step, max_steps))


def build_step_counting(router_cfg, moe_cfg, d_model, context):
    return StepCountingRouter(d_model, Routing.of(moe_cfg))


class CountingGPT(GPT):
    """The GPT backbone with a memory: it counts its training forwards in the state it returns."""

    def forward(self, idx_BT, targets_BT=None, mask_BT=None, state=None):
        out = super().forward(idx_BT, targets_BT, mask_BT)
        if self.training:
            out.state = (state or 0) + 1
        return out


class Recorder(TrainerHook):

    def __init__(self):
        self.events = []
        self.states = []

    def on_step_start(self, trainer, step):
        self.events.append(("start", step))

    def on_step_end(self, trainer, step):
        self.events.append(("end", step))
        self.states.append(trainer.task.state)

    def after_evaluation(self, trainer, step, split, result):
        self.events.append(("eval", step, split, round(result["bpc"], 6) > 0))

    def before_checkpoint_commit(self, trainer, step, path):
        self.events.append(("commit", step, os.path.isfile(os.path.join(path, "COMPLETE"))))

    def after_checkpoint(self, trainer, step, path):
        self.events.append(("saved", step, os.path.isfile(os.path.join(path, "COMPLETE"))))


def _extended_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.train import model_preset, pretrain
    # The registry lines a new router and a new backbone add.
    ROUTERS["step-counting"] = RouterSpec(build=build_step_counting, config=None)
    BACKBONES["counting-gpt"] = BackboneSpec(build=CountingGPT, settings=None,
                                             attention_flops=BACKBONES["gpt"].attention_flops)
    try:
        model = model_preset("tiny", backbone="counting-gpt", d_model=32, d_inner=64, max_seq_len=32,
                             moe=dict(num_experts=4, router="step-counting"))
        recorder = Recorder()
        trainer_out = {}

        class KeepTrainer(TrainerHook):
            def on_step_end(self, trainer, step):
                trainer_out["trainer"] = trainer

        final = pretrain(_experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=32, max_steps=3,
                                     eval_interval=2, save_interval=2, log_interval=1),
                         _ds_config(), hooks=[recorder, KeepTrainer()])
        from s2moe_ds.moe import expert_blocks
        routers = [block.router for block in expert_blocks(trainer_out["trainer"].engine.module)]
        return {"events": recorder.events, "states": recorder.states, "router_steps": [r.steps for r in routers],
                "router_kinds": [r.kind for r in routers], "steps": final["step"]}
    finally:
        del ROUTERS["step-counting"], BACKBONES["counting-gpt"]


def test_a_router_and_a_backbone_from_outside_train_with_every_hook(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    results = run_distributed(_extended_worker, 2, (str(text), str(out), str(tmp_path / "cache")))
    for r in results:
        assert r["steps"] == 3 and r["router_kinds"] == ["step-counting"] * 2
        # Every router of the model saw every step, before the step ran.
        assert r["router_steps"] == [[(1, 3), (2, 3), (3, 3)]] * 2
        # Hooks fire on every rank, in phase order; a checkpoint is committed only after its hook.
        assert r["events"] == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("eval", 2, "valid", True),
                               ("commit", 2, False), ("saved", 2, True), ("start", 3), ("end", 3),
                               ("eval", 3, "valid", True), ("commit", 3, False), ("saved", 3, True)]
        # The backbone's state went from each training forward to the next (2 micro-batches per step).
        assert r["states"] == [2, 4, 6]
    assert json.loads((out / "run_config.json").read_text())["task"] == "lm"  # the task is recorded with the run
    meta = json.loads((out / "checkpoints" / "step00000003" / "meta.json").read_text())
    assert meta["model_config"]["backbone"] == "counting-gpt"
    assert meta["model_config"]["moe"]["router"] == "step-counting"


def test_unknown_registry_names_are_refused_with_the_choices():
    from s2moe_ds.config import ConfigError
    from s2moe_ds.models import build_model, model_config_from_dict
    from s2moe_ds.train import ExperimentConfig
    for make in (lambda: ExperimentConfig(model=ModelConfig(backbone="transformer-xl")),
                 lambda: model_config_from_dict({"backbone": "transformer-xl"}),
                 lambda: build_model(ModelConfig(backbone="transformer-xl"))):
        with pytest.raises(ConfigError, match=r"model\.backbone: must be one of 'gpt'"):
            make()
