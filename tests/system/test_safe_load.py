"""Checkpoints are read weights-only: a crafted file whose pickle would run code is refused by every
entry point (resume on 2 ranks, evaluate, generate, consolidate, fine-tune), the code never runs,
and the error names the file; every file we write loads under the allowlist."""

import json
import os
import pathlib
import re
import shutil

import pytest
import torch

from s2moe_ds.checkpoint import MANIFEST, UnsafeCheckpointError, check_step_folder, consolidate, load_file
from s2moe_ds.checkpoint.manifest import file_digest

from ..harness import run_distributed
from .test_pretrain import TEXT, _ds_config, _experiment
from s2moe_ds.train import model_preset


REFUSAL = "checkpoint file {}: refused to unpickle it: its pickle asks for builtins.getattr, pathlib.Path"


class Payload:
    """Unpickling this calls pathlib.Path.touch(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _train_worker(rank, world_size, text, out_dir, cache, resume):
    from s2moe_ds.train import pretrain
    model = model_preset("tiny", d_model=32, d_inner=64, max_seq_len=32, moe=dict(num_experts=4))
    train = dict(out_dir=out_dir, seq_len=32, max_steps=4 if resume else 2, eval_interval=0, save_interval=2,
                 resume=resume)
    if not resume:
        return pretrain(_experiment(model, world_size, text, cache, **train), _ds_config())["step"]
    with pytest.raises(UnsafeCheckpointError) as e:
        pretrain(_experiment(model, world_size, text, cache, **train), _ds_config())
    return str(e.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    (root / "corpus.txt").write_text(TEXT)
    run_distributed(_train_worker, 2, (str(root / "corpus.txt"), str(root / "run"), str(root / "cache"), False))
    return root


def _poisoned(run, tmp_path, name):
    """A copy of the run whose step folder's file `name` also holds the payload."""
    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    step = copy / "checkpoints" / "step00000002"
    path = step / name
    original = torch.load(path, weights_only=False)
    torch.save({**original, "extra": Payload(str(tmp_path / "PWNED"))} if isinstance(original, dict)
               else Payload(str(tmp_path / "PWNED")), path)
    # A crafted checkpoint comes with a manifest that matches it: the pickle check must refuse it.
    manifest = json.loads((step / MANIFEST).read_text())
    manifest["files"][name] = file_digest(str(path))
    (step / MANIFEST).write_text(json.dumps(manifest))
    return copy, step, path


def test_every_file_we_write_loads_weights_only(run):
    step = run / "run" / "checkpoints" / "step00000002"
    check_step_folder(str(step))
    for name in os.listdir(step):
        if name.endswith(".pt"):
            load_file(str(step / name))
    state, client = consolidate(str(run / "run"))
    assert client["step"] == 2 and any("experts" in k for k in state)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "layer_1_expert_3_mp_rank_00_model_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt"])
def test_a_file_that_would_run_code_is_refused_everywhere(run, tmp_path, capsys, name):
    copy, step, path = _poisoned(run, tmp_path, name)
    marker = tmp_path / "PWNED"
    # Resume on 2 ranks: every rank refuses before any collective, whichever rank's file it is.
    messages = run_distributed(_train_worker, 2, (str(run / "corpus.txt"), str(copy), str(run / "cache"), True))
    assert all(m.startswith(REFUSAL.format(path)) for m in messages), messages
    assert not marker.exists()
    if name.startswith(("mp_rank", "layer_")):
        # The files that evaluation, sampling, consolidation and fine-tuning read.
        from launch.consolidate import main as consolidate_main
        from launch.evaluate import main as evaluate_main
        from launch.generate import main as generate_main
        for main, argv in ((evaluate_main, ["--checkpoint", str(copy)]),
                           (generate_main, ["--checkpoint", str(copy), "--max-new-tokens", "2"]),
                           (consolidate_main, [str(copy), "--out", str(tmp_path / "out.pt")])):
            assert main(argv) == 2
            # One message from every entry point: the file and what its pickle asks for, not torch's advice.
            assert REFUSAL.format(path) in capsys.readouterr().err
        with pytest.raises(UnsafeCheckpointError, match=re.escape(REFUSAL.format(path))):
            from s2moe_ds.train.finetune import ClassificationTask, FinetuneConfig
            from s2moe_ds.data import ClassificationDataConfig
            task = ClassificationTask(FinetuneConfig(pretrained=str(copy), data=ClassificationDataConfig(
                dataset="shakespeare-speakers", path=str(run / "corpus.txt"))))
            task.step_dir = str(step)
            task.cfg.init = "pretrained"
            task.load_initial_weights(None, None)
    assert not marker.exists(), "the payload ran"
