"""A received checkpoint is data, not instructions: evaluate never opens a corpus, tokenizer or cache
folder its settings name outside its run folder (it says which, and the flag that passes it), a
model config that its weights do not fit is refused before any model is built, evaluate writes
neither into a checkpoint nor through a link the received folder holds, and bad flags of evaluate
and generate stop the command before the checkpoint is read."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from s2moe_ds.checkpoint import MANIFEST, load_file
from s2moe_ds.checkpoint.consolidate import check_config_fits, model_from_state, stored_shapes
from s2moe_ds.checkpoint.manifest import file_digest
from s2moe_ds.config import ConfigError
from s2moe_ds.models import model_config_from_dict

from ..harness import run_distributed
from .test_pretrain import TEXT, _pretrain_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATES = "mp_rank_00_model_states.pt"
STEP = "step00000003"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step S2MoE run on one process, trained on a corpus outside its run folder."""
    root = tmp_path_factory.mktemp("untrusted")
    (root / "corpus.txt").write_text(TEXT)
    run_distributed(_pretrain_worker, 1, (str(root / "corpus.txt"), str(root / "run"), str(root / "cache"),
                                          dict(max_steps=3)))
    return root


def _crafted(trained, tmp_path, data=None, model=None, meta_model=None):
    """A copy of the run whose step folder records other data settings or model config, with a
    manifest that matches: what someone could hand over."""
    copy = tmp_path / "received"
    shutil.copytree(trained / "run", copy)
    step = copy / "checkpoints" / STEP
    manifest = json.loads((step / MANIFEST).read_text())
    states = load_file(str(step / STATES))
    if data is not None:
        states["run"]["data"] = data(copy)
    if model is not None:
        states["model_config"] = {**states["model_config"], **model}
    torch.save(states, step / STATES)
    manifest["files"][STATES] = file_digest(str(step / STATES))
    if meta_model is not None:
        meta = json.loads((step / "meta.json").read_text())
        meta["model_config"] = {**meta["model_config"], **meta_model}
        (step / "meta.json").write_text(json.dumps(meta))
        manifest["files"]["meta.json"] = file_digest(str(step / "meta.json"))
    (step / MANIFEST).write_text(json.dumps(manifest))
    return copy


def _evaluate(checkpoint, tmp_path, *flags):
    """launch/evaluate.py with HOME in tmp_path (the default cache goes there); a FIFO it opened
    would block it until the timeout."""
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), "--checkpoint",
                           str(checkpoint), "--splits", "valid", "--eval-k", "1", "--out-dir", str(tmp_path / "eval"),
                           *flags], capture_output=True, text=True, timeout=300, env=env)


def _outside(tmp_path):
    """A folder outside the run holding a FIFO: opening it for reading blocks until a writer comes."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.mkfifo(outside / "secret")
    return outside


def test_a_recorded_corpus_outside_the_run_is_never_opened(trained, tmp_path):
    outside = _outside(tmp_path)
    fifo, cache = str(outside / "secret"), str(outside / "cache")
    received = _crafted(trained, tmp_path, data=lambda run: {"dataset": "path", "path": fifo, "cache_dir": cache})
    proc = _evaluate(received, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.path={fifo!r}" in proc.stderr and f"--path {fifo}" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(cache) and not (tmp_path / "eval").exists()
    # The user passes the corpus: it is evaluated, and the recorded cache folder is still not made.
    proc = _evaluate(received, tmp_path, "--path", str(trained / "corpus.txt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data.cache_dir={cache!r}" in proc.stdout and "--cache-dir" in proc.stdout
    assert not os.path.exists(cache)
    assert os.listdir(tmp_path / "home" / ".cache" / "s2moe_ds")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["data"]["path"] == str(trained / "corpus.txt")


def test_recorded_split_files_outside_the_run_name_every_flag(trained, tmp_path):
    outside = _outside(tmp_path)
    files = {name: str(outside / "secret") for name in ("train_file", "valid_file", "test_file")}
    received = _crafted(trained, tmp_path, data=lambda run: {"dataset": "path", **files})
    proc = _evaluate(received, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for name, value in files.items():
        assert f"data.{name}={value!r}" in proc.stderr and f"--{name.replace('_', '-')} {value}" in proc.stderr


def test_inside_the_run_the_recorded_corpus_is_used_and_tokenizer_and_cache_outside_are_not(trained, tmp_path):
    outside = _outside(tmp_path)
    fifo, cache = str(outside / "secret"), str(outside / "cache")

    def data(run):
        shutil.copy(trained / "corpus.txt", run / "corpus.txt")
        return {"dataset": "path", "path": str(run / "corpus.txt"), "tokenizer": fifo, "cache_dir": cache}
    received = _crafted(trained, tmp_path, data=data)
    proc = _evaluate(received, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data.tokenizer={fifo!r}" in proc.stdout and f"data.cache_dir={cache!r}" in proc.stdout
    assert not os.path.exists(cache)
    got = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert got["data"]["path"] == str(received / "corpus.txt")
    # The step folder's tokenizer gives the very numbers of the run evaluated as trained.
    reference = _evaluate(trained / "run", tmp_path / "ref", "--path", str(trained / "corpus.txt"),
                          "--cache-dir", str(trained / "cache"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    want = json.loads((tmp_path / "ref" / "eval" / "eval.json").read_text())
    assert got["results"][0]["bpc"] == pytest.approx(want["results"][0]["bpc"], abs=1e-6)


def _limited_memory():
    # 16 GiB of address space: a regression that builds the model fails fast instead of filling the machine.
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))


def _refused(received, script, *argv):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), "--checkpoint", str(received), *argv],
                          capture_output=True, text=True, timeout=120, preexec_fn=_limited_memory)
    assert proc.returncode == 2, (script, proc.stderr[-3000:])
    return proc.stderr


@pytest.mark.parametrize("field, value", [("d_model", 10**6), ("vocab_size", 10**9), ("n_layer", 10**9)])
def test_a_model_config_too_large_for_its_weights_is_refused_before_building(trained, tmp_path, field, value):
    """Building it would take terabytes (d_model, vocab_size) or for ever (n_layer)."""
    received = _crafted(trained, tmp_path, model={field: value}, meta_model={field: value})
    err = _refused(received, "evaluate.py")
    assert f"model_config.{field}={value}" in err and str(received / "checkpoints" / STEP / STATES) in err, err
    from s2moe_ds.train.finetune import pretrained_meta
    with pytest.raises(ConfigError, match=rf"finetune.pretrained: .*meta.json: model_config.{field}={value}"):
        pretrained_meta(str(received))


def test_generate_refuses_a_model_config_too_large_for_its_weights(trained, tmp_path):
    received = _crafted(trained, tmp_path, model={"d_model": 10**6})
    err = _refused(received, "generate.py", "--max-new-tokens", "2")
    assert "model_config.d_model=1000000" in err and str(received / "checkpoints" / STEP / STATES) in err, err


def test_a_model_config_that_differs_from_its_weights_names_the_tensor_and_field(trained):
    step = str(trained / "run" / "checkpoints" / STEP)
    shapes = stored_shapes(step)
    client = {k: v for k, v in load_file(os.path.join(step, STATES)).items() if k == "model_config"}
    cfg = model_config_from_dict(client["model_config"])
    check_config_fits(cfg, shapes, "here")  # the real one fits
    d = cfg.d_model
    with pytest.raises(ConfigError, match=rf"here: .*is stored as \(\d+, {d}\).*model_config.d_model={2 * d}"):
        check_config_fits(model_config_from_dict({**cfg.to_dict(), "d_model": 2 * d}), shapes, "here")
    fewer = {**cfg.to_dict(), "moe": {**cfg.to_dict()["moe"], "num_experts": cfg.moe.num_experts // 2, "k": 1,
                                       "eval_k": 1}}
    with pytest.raises(ConfigError, match=r"here: .*model_config.moe.num_experts=2 gives"):
        check_config_fits(model_config_from_dict(fewer), shapes, "here")
    with pytest.raises(ConfigError, match="model_config.d_model"):
        model_from_state({k: torch.zeros(s) for k, s in shapes.items()},
                         {"model_config": {**cfg.to_dict(), "d_model": 2 * d}}, where="here")


@pytest.mark.parametrize("argv, flag", [
    (["--top-k", "0"], "--top-k"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--eval-k", "0"], "--eval-k"),
])
def test_bad_generate_flags_are_named_before_the_checkpoint_is_read(tmp_path, capsys, argv, flag):
    from launch.generate import main
    # No checkpoint there: the flag must be refused first.
    assert main(["--checkpoint", str(tmp_path / "nothing"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}: must be"), err


@pytest.mark.parametrize("where", ["file", "/proc/self/eval"])
def test_an_evaluate_out_dir_that_cannot_be_written_is_named_first(tmp_path, capsys, where):
    from launch.evaluate import main
    if where == "file":
        (tmp_path / "report").write_text("")
        where = str(tmp_path / "report" / "eval")
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--out-dir", where]) == 2
    assert "eval.out_dir" in capsys.readouterr().err


def _received_copy(trained, tmp_path):
    copy = tmp_path / "received"
    shutil.copytree(trained / "run", copy)
    return copy


def _evaluate_here(main, trained, checkpoint, *flags):
    """launch/evaluate.py in this process on the real corpus (passed, so that only the out-dir can stop it)."""
    return main(["--checkpoint", str(checkpoint), "--splits", "valid", "--eval-k", "1", "--max-batches", "1",
                 "--path", str(trained / "corpus.txt"), "--cache-dir", str(trained / "cache"), *flags])


def test_evaluate_analysis_replaces_links_planted_in_its_default_out_dir(trained, tmp_path, capsys):
    """The default out-dir is <run>/eval/<step>, inside the received folder: a link planted under a
    name evaluate writes is replaced by the new file, its target left as it was."""
    from launch.evaluate import main
    received = _received_copy(trained, tmp_path)
    victim = tmp_path / "bashrc"
    victim.write_text("mine\n")
    plots = received / "eval" / STEP / "plots"
    plots.mkdir(parents=True)
    planted = [plots / "layer0_routing.png", received / "eval" / STEP / "eval.json",
               received / "eval" / STEP / "analysis.json"]
    for link in planted:
        link.symlink_to(victim)
    status = _evaluate_here(main, trained, received, "--analysis", "--analysis-tokens", "64")
    assert status == 0, capsys.readouterr().err
    assert victim.read_bytes() == b"mine\n"
    for path in planted:
        assert not path.is_symlink() and path.stat().st_size > 100, path
    # Its own eval/<step> of before is no checkpoint folder: evaluated again, it is written again.
    assert _evaluate_here(main, trained, received) == 0, capsys.readouterr().err


@pytest.mark.parametrize("link, out_dir", [
    ("eval", None), (f"eval/{STEP}", None), (f"eval/{STEP}/plots", None), (f"eval/{STEP}/tensorboard", None),
    ("eval", "eval/mine"),
])
def test_an_out_dir_through_a_link_in_the_run_folder_is_refused(trained, tmp_path, capsys, link, out_dir):
    """A planted `eval -> anywhere` would send eval.json, analysis.json, plots and TensorBoard files
    there: refused before the weights are read, naming the link and --out-dir."""
    from launch.evaluate import main
    received = _received_copy(trained, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (received / link).parent.mkdir(parents=True, exist_ok=True)
    (received / link).symlink_to(elsewhere, target_is_directory=True)
    flags = ["--analysis", "--analysis-tokens", "64"] + (["--out-dir", str(received / out_dir)] if out_dir else [])
    assert _evaluate_here(main, trained, received, *flags) == 2
    err = capsys.readouterr().err
    assert f"eval.out_dir: {received / link} is a symbolic link" in err and "pass --out-dir" in err, err
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("where", ["step", "checkpoints", "lone step"])
def test_evaluate_never_writes_into_a_checkpoint(trained, tmp_path, capsys, where):
    """An eval.json in a step folder would fail its manifest (a resume then skips the step)."""
    from launch.evaluate import main
    received = _received_copy(trained, tmp_path)
    checkpoint, flags = received, []
    if where == "step":
        out = received / "checkpoints" / STEP / "eval"
        flags = ["--out-dir", str(out)]
    elif where == "checkpoints":
        out = received / "checkpoints" / "eval"
        flags = ["--out-dir", str(out)]
    else:  # a step folder alone in a folder of step folders: the default out-dir would be <that folder>/eval
        lone = tmp_path / "saved"
        lone.mkdir()
        shutil.copytree(received / "checkpoints" / STEP, lone / STEP)
        checkpoint, out = lone / STEP, lone / "eval"
    assert _evaluate_here(main, trained, checkpoint, *flags) == 2
    err = capsys.readouterr().err
    assert "eval.out_dir:" in err and "inside the checkpoint folder" in err and "pass --out-dir" in err, err
    assert not out.exists()


def _fake_step(folder):
    step = folder / "checkpoints" / STEP
    step.mkdir(parents=True)
    return str(step)


def test_the_folder_above_checkpoints_is_the_run_only_with_its_run_config(tmp_path):
    """A received checkpoints/ tree unpacked into a home folder does not make the home folder the run's."""
    from s2moe_ds.eval.evaluate import data_settings
    home = tmp_path / "home"
    step = _fake_step(home)
    secret = str(home / ".ssh" / "id_rsa")
    with pytest.raises(ConfigError, match=re.escape(f"data.path={secret!r}, outside its run folder {step};")):
        data_settings({"dataset": "path", "path": secret}, {}, step)
    (home / "run_config.json").write_text("{}")
    assert data_settings({"dataset": "path", "path": secret}, {}, step)["path"] == secret


def test_relative_recorded_paths_name_no_folder_of_the_run(tmp_path, monkeypatch):
    """They would resolve against the folder evaluate runs in, whatever it is."""
    from s2moe_ds.eval.evaluate import data_settings
    run = tmp_path / "run"
    step = _fake_step(run)
    (run / "run_config.json").write_text("{}")
    (run / "corpus.txt").write_text(TEXT)
    monkeypatch.chdir(run)
    with pytest.raises(ConfigError, match=r"data.path: .*'corpus.txt', a relative path, which names no folder"):
        data_settings({"dataset": "path", "path": "corpus.txt"}, {}, step)
    notes = []
    settings = data_settings({"dataset": "path", "path": str(run / "corpus.txt"), "tokenizer": "tok.json"}, {},
                             step, notes.append)
    assert settings["tokenizer"] == os.path.join(step, "tokenizer.json")
    assert "data.tokenizer='tok.json', a relative path" in notes[0]


def test_a_recorded_tokenizer_since_pruned_falls_back_to_the_step_folders_own(tmp_path):
    from s2moe_ds.eval.evaluate import data_settings
    run = tmp_path / "run"
    step = _fake_step(run)
    (run / "run_config.json").write_text("{}")
    pruned = str(run / "checkpoints" / "step00000001" / "tokenizer.json")
    notes = []
    settings = data_settings({"dataset": "path", "path": str(run / "corpus.txt"), "tokenizer": pruned}, {},
                             step, notes.append)
    assert settings["tokenizer"] == os.path.join(step, "tokenizer.json")
    assert f"data.tokenizer={pruned!r}, which no longer exists" in notes[0]
    # One the user passes is theirs to get wrong: no fallback.
    assert data_settings({"dataset": "path"}, {"tokenizer": pruned}, step)["tokenizer"] == pruned
