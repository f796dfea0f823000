"""Nothing non-finite is taken as a setting or saved as healthy (issue 24): every float setting
refuses NaN and infinity, the DeepSpeed config's optimizer and scheduler are checked field by
field before any compute (status 2 on every rank), a checkpoint is written only from finite
weights (the run ends naming the last healthy one), and no checkpoint is opened on a torch whose
weights-only unpickler has published bypasses."""

import json
import math
import os
from dataclasses import fields

import pytest
import torch

from s2moe_ds.config import ConfigError
from s2moe_ds.data import DataConfig
from s2moe_ds.data.classification import ClassificationDataConfig
from s2moe_ds.models import ModelConfig
from s2moe_ds.models.registry import BACKBONES
from s2moe_ds.moe.config import MoEConfig
from s2moe_ds.moe.registry import BLOCKS, ROUTERS
from s2moe_ds.parallel import ParallelConfig, check_ds_config, load_ds_config
from s2moe_ds.train import TrainConfig, TrainerHook, model_preset
from s2moe_ds.train.finetune import FinetuneConfig

from ..harness import run_distributed
from .test_pretrain import TEXT, _deepspeed_launch, _ds_config, _experiment, _pretrain_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _float_fields(cls):
    return [f.name for f in fields(cls) if "float" in str(f.type)]


def _float_settings():
    """(what, build(value)) for every float field of every config dataclass: the run's, the
    model's and its backbones', the MoE's and every block kind's and router's, the data's."""
    out = []
    for cls, build in ((TrainConfig, lambda name, v: TrainConfig(**{name: v})),
                       (ModelConfig, lambda name, v: ModelConfig(**{name: v})),
                       (MoEConfig, lambda name, v: MoEConfig(**{name: v})),
                       (ParallelConfig, lambda name, v: ParallelConfig(**{name: v})),
                       (ClassificationDataConfig, lambda name, v: ClassificationDataConfig(dataset="sst2",
                                                                                            **{name: v})),
                       (FinetuneConfig, lambda name, v: FinetuneConfig(pretrained="runs/x", data={"dataset": "sst2"},
                                                                       **{name: v}))):
        out += [(f"{cls.__name__}.{name}", lambda v, b=build, n=name: b(n, v)) for name in _float_fields(cls)]
    for kind, spec in BLOCKS.items():
        if spec.config is not None:
            out += [(f"block {kind}.{name}", lambda v, k=kind, n=name: MoEConfig(block=k, block_config={n: v}))
                    for name in _float_fields(spec.config)]
    for router, spec in ROUTERS.items():
        if spec.config is not None:
            out += [(f"router {router}.{name}", lambda v, r=router, n=name: MoEConfig(router=r, router_config={n: v}))
                    for name in _float_fields(spec.config)]
    for backbone, spec in BACKBONES.items():
        if spec.settings is not None:
            out += [(f"backbone {backbone}.{name}",
                     lambda v, b=backbone, n=name: ModelConfig(backbone=b, backbone_config={n: v}))
                    for name in _float_fields(spec.settings)]
    out.append(("DataConfig.split", lambda v: DataConfig(split=(v, 0.05, 0.05))))
    return out


SETTINGS = _float_settings()


def test_the_audit_reaches_every_kind_of_config():
    names = {what for what, _ in SETTINGS}
    for expected in ("TrainConfig.lr", "TrainConfig.hang_timeout_s", "ModelConfig.dropout", "MoEConfig.capacity_factor",
                     "block s2moe.noise_scale", "block s2moe.mix_gate_init_bias", "router xmoe.xmoe_temperature",
                     "router stablemoe.stablemoe_distill_coef", "ClassificationDataConfig.valid_fraction",
                     "FinetuneConfig.dropout"):
        assert expected in names, sorted(names)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("what, build", SETTINGS, ids=[what for what, _ in SETTINGS])
def test_every_float_setting_refuses_nan_and_infinity(what, build, value):
    field = what.split(".")[-1]
    with pytest.raises(ConfigError, match=field):
        build(value)


def test_a_huge_integer_is_a_finite_number():
    assert TrainConfig(hang_timeout_s=10**400).hang_timeout_s == 10**400  # no OverflowError on the way


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "inf"], "train.lr: must be a finite number > 0.0, got inf"),
    (["--lr", "nan"], "train.lr: must be a finite number > 0.0, got nan"),
    (["--capacity-factor", "inf"], "moe.capacity_factor: must be a finite number > 0.0, got inf"),
    (["--noise-scale", "nan"], "noise_scale: must be a finite number >= 0.0, got nan"),
])
def test_a_non_finite_flag_is_refused_with_status_2(flags, expected, tmp_path, capsys):
    from launch.pretrain import main
    assert main(["--deepspeed_config", "ds_configs/zero2.json", "--out-dir", str(tmp_path / "run"), *flags]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was made


# ----------------------------------------------------------------------- the DeepSpeed config

def _zero2():
    with open(os.path.join(ROOT, "ds_configs", "zero2.json")) as f:
        return json.load(f)


def _with(path, value):
    """zero2.json with the value at a dotted path replaced (None at the top: the whole config)."""
    cfg = _zero2()
    *outer, last = path.split(".")
    node = cfg
    for key in outer:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


BAD_DS_CONFIGS = [
    (_with("optimizer.params.lr", -0.001),
     "optimizer.params.lr: must be a finite number > 0, got -0.001; e.g. 0.001"),
    (_with("optimizer.params.lr", math.nan), "optimizer.params.lr: must be a finite number, got nan"),
    (_with("optimizer.params.lr", math.inf), "optimizer.params.lr: must be a finite number, got inf"),
    (_with("optimizer.params.lr", "1e-3"), "optimizer.params.lr: must be a finite number > 0, got '1e-3' (a JSON number "
                                           "has no quotes)"),
    (_with("optimizer.params.betas", [0.9]), "optimizer.params.betas: must be a list of two numbers in [0, 1)"),
    (_with("optimizer.params.betas", [0.9, "0.95"]), "optimizer.params.betas: must be a list of two numbers"),
    (_with("optimizer.params.betas", [0.9, 1.5]), "optimizer.params.betas: must be a list of two numbers in [0, 1)"),
    (_with("optimizer.params.betas", [0.9, -math.inf]), "optimizer.params.betas[1]: must be a finite number"),
    (_with("optimizer.params.weight_decay", "0.01"), "optimizer.params.weight_decay: must be a finite number >= 0"),
    (_with("optimizer.params.eps", -1e-8), "optimizer.params.eps: must be a finite number >= 0"),
    (_with("optimizer", None), "optimizer: must be an object such as {\"type\": \"AdamW\""),
    (_with("optimizer", "AdamW"), "optimizer: must be an object such as"),
    (_with("optimizer.params", None), "optimizer.params: must be an object of the optimizer's settings, got null"),
    (_with("scheduler", None), "scheduler: must be an object such as {\"type\": \"WarmupCosineLR\""),
    (_with("scheduler", {"type": "Cosine"}), "scheduler.type: 'Cosine' is not a DeepSpeed schedule"),
    (_with("scheduler", {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "10"}}),
     "scheduler.params.warmup_num_steps: must be a finite number >= 0, got '10'"),
    (_with("scheduler", {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 2}}),
     "scheduler.params.cos_min_ratio: must be a finite number >= 0 and <= 1, got 2"),
    (_with("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": math.nan}}),
     "scheduler.params.warmup_max_lr: must be a finite number, got nan"),
    (_with("scheduler", {"type": "WarmupLR", "params": {"warmup_max_lr": -1}}),
     "scheduler.params.warmup_max_lr: must be a finite number >= 0, got -1"),
    (_with("scheduler", {"type": "WarmupLR", "params": None}), "scheduler.params: must be an object"),
    (_with("gradient_clipping", math.inf), "gradient_clipping: must be a finite number, got inf"),
    (_with("zero_optimization", [2]), "zero_optimization: must be an object of settings"),
    ([_zero2()], "deepspeed_config: the DeepSpeed config holds an array at its top level; a DeepSpeed config is one "
                 "JSON object"),
]


@pytest.mark.parametrize("cfg, expected", BAD_DS_CONFIGS, ids=[e.split(":")[0] + f"-{i}"
                                                              for i, (_, e) in enumerate(BAD_DS_CONFIGS)])
def test_a_bad_deepspeed_config_is_named_by_its_json_path(cfg, expected):
    with pytest.raises(ConfigError) as info:
        check_ds_config(cfg)
    assert expected in str(info.value)


def test_every_shipped_deepspeed_config_passes():
    for name in sorted(os.listdir(os.path.join(ROOT, "ds_configs"))):
        check_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", name)))
    check_ds_config(_with("scheduler", {"type": "WarmupDecayLR", "params": {"total_num_steps": 100,
                                                                           "warmup_max_lr": None}}))


def test_nan_and_a_list_in_a_json_file_are_named_with_the_file(tmp_path):
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(_zero2()).replace('"lr": 0.002', '"lr": NaN'))
    with pytest.raises(ConfigError, match=r"optimizer\.params\.lr: must be a finite number, got nan"):
        check_ds_config(load_ds_config(str(nan)))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([_zero2()]))
    with pytest.raises(ConfigError, match=f"deepspeed_config: {listed} holds an array at its top level"):
        load_ds_config(str(listed))


def test_a_bad_deepspeed_config_stops_the_launch_script_with_status_2(tmp_path, capsys):
    from launch.pretrain import main
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_with("optimizer", None)))
    assert main(["--deepspeed_config", str(path), "--out-dir", str(tmp_path / "run")]) == 2
    assert "error: optimizer: must be an object" in capsys.readouterr().err
    # --lr does not make a bad learning rate in the file acceptable: the file is still wrong.
    path.write_text(json.dumps(_with("optimizer.params.lr", -1)))
    assert main(["--deepspeed_config", str(path), "--out-dir", str(tmp_path / "run"), "--lr", "0.001"]) == 2
    assert "optimizer.params.lr: must be a finite number > 0, got -1" in capsys.readouterr().err


def test_every_rank_refuses_a_nan_learning_rate_before_compute(tmp_path):
    """Under the deepspeed launcher, 2 ranks: each checks the file before any collective and exits
    with status 2 naming the field (the launcher may kill the second once the first is out)."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    bad = tmp_path / "nan.json"
    bad.write_text(json.dumps(_zero2()).replace('"lr": 0.002', '"lr": NaN'))
    out = tmp_path / "run"
    result = _deepspeed_launch(str(bad), str(text), tmp_path, out, "--max-steps", "2", timeout=300, expect=2)
    log = result.stdout + result.stderr
    assert "error: optimizer.params.lr: must be a finite number, got nan" in log, log[-3000:]
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------- non-finite weights

def _listing(ckpt_dir):
    return sorted(d for d in os.listdir(ckpt_dir) if "step" in d)


class _PoisonAnExpert(TrainerHook):
    """After step `step`, one expert weight of rank 1 becomes NaN, as an update can leave an expert
    that no token reached: no loss shows it."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step and trainer.rank == 1:
            param = next(p for n, p in trainer.engine.module.named_parameters() if "experts" in n)
            with torch.no_grad():
                param.view(-1)[0] = math.nan


def _poisoned_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.checkpoint import latest_tag
    from s2moe_ds.train.trainer import NonFiniteWeightsError
    hook = _PoisonAnExpert(step=4)
    with pytest.raises(NonFiniteWeightsError) as info:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=4, save_interval=2, eval_interval=0),
                         hooks=[hook])
    ckpt = os.path.join(out_dir, "checkpoints")
    return {"message": str(info.value), "listing": _listing(ckpt), "latest": latest_tag(ckpt)}


def test_non_finite_weights_are_never_saved_and_the_run_names_the_last_healthy_checkpoint(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    results = run_distributed(_poisoned_worker, 2, (str(text), str(out), str(tmp_path / "cache")))
    healthy = f"the last healthy checkpoint is {out / 'checkpoints' / 'step00000002'} (step 2), which --resume takes"
    assert results[1]["message"].startswith("non-finite weights after step 4: rank 1's ")
    assert "deepspeed_experts" in results[1]["message"]
    assert results[0]["message"].startswith("non-finite weights after step 4: on another rank")
    for r in results:
        assert "the checkpoint of step 4 was not written" in r["message"] and healthy in r["message"]
        assert r["listing"] == ["step00000002"] and r["latest"] == "step00000002"


def _nan_gradient_task(text, cache, rank, step):
    """Language modelling whose loss at `step`, on rank 1, gains a term that is 0 with a NaN
    gradient (the branch torch.where did not take): the loss stays finite, the update is not."""
    from s2moe_ds.data import DataConfig
    from s2moe_ds.train import LanguageModelingTask

    class NaNGradient(LanguageModelingTask):
        calls = 0

        def loss(self, out, terms):
            total, parts = super().loss(out, terms)
            NaNGradient.calls += 1
            if NaNGradient.calls == 2 * step and rank == 1:  # 2 micro-batches a step
                ones = torch.ones_like(total)
                total = total + torch.where(ones > 0, 0 * ones, torch.sqrt(-ones - total))
            return total, parts

    return NaNGradient(DataConfig(dataset="path", path=text, cache_dir=cache), seq_len=32)


def _nan_gradient_worker(rank, world_size, text, out_dir, cache):
    from s2moe_ds.checkpoint import latest_tag
    from s2moe_ds.train import UnhealthyLossError
    from s2moe_ds.train import pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4))
    experiment = _experiment(model, world_size, text, cache, out_dir=out_dir, seq_len=32, max_steps=3, warmup_steps=1,
                             save_interval=2, eval_interval=0)
    # ZeRO 0: ZeRO 1 and 2 skip a step whose gradients are not finite (weights unchanged).
    with pytest.raises(UnhealthyLossError) as info:
        pretrain(experiment, _ds_config(stage=0), task=_nan_gradient_task(text, cache, rank, step=3))
    ckpt = os.path.join(out_dir, "checkpoints")
    return {"message": str(info.value), "listing": _listing(ckpt), "latest": latest_tag(ckpt)}


def test_a_last_update_that_is_not_finite_ends_the_run_naming_the_last_healthy_checkpoint(tmp_path):
    """The loss of the last step was finite, so no loss check could see its NaN gradient."""
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "run"
    results = run_distributed(_nan_gradient_worker, 2, (str(text), str(out), str(tmp_path / "cache")))
    for rank, r in enumerate(results):
        assert r["message"].startswith(f"non-finite weights after step 3: rank {rank}'s "), r["message"]
        assert f"the last healthy checkpoint is {out / 'checkpoints' / 'step00000002'} (step 2)" in r["message"]
        assert r["listing"] == ["step00000002"] and r["latest"] == "step00000002"


# ----------------------------------------------------------------------- the torch version

@pytest.mark.parametrize("version, refused", [("2.5.1", True), ("2.9.1+cu128", True), ("2.10.0a0+git1234", True),
                                              ("2.10.0", False), ("2.13.0+cpu", False)])
def test_checkpoints_are_not_opened_on_a_torch_with_unpickler_bypasses(version, refused, tmp_path, monkeypatch):
    from s2moe_ds.checkpoint.safe_load import UnsafeCheckpointError, check_file, load_file
    path = str(tmp_path / "w.pt")
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", version)
    if not refused:
        check_file(path)
        assert load_file(path)["w"].tolist() == [1.0, 1.0]
        return
    for read in (check_file, load_file):
        with pytest.raises(UnsafeCheckpointError) as info:
            read(path)
        assert str(info.value).startswith(f"torch {version}: checkpoint files are not opened with torch older "
                                          "than 2.10")
        assert "CVE-2025-32434" in str(info.value) and "CVE-2026-24747" in str(info.value)
        assert "pip install 'torch>=2.10'" in str(info.value)
