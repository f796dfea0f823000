"""Nothing destroys what it did not create (issue 24): a copied or renamed step folder is ignored,
so that --resume takes the newest real step and overwrites no folder; a save sets a complete
folder of its step aside instead of deleting it; the run lock and atomic writes never follow a
symbolic link; consolidate never writes into a checkpoint nor over a file it did not write, and
the Hugging Face export deletes nothing beside its output; DeepSpeed's recovery scripts are gone
from checkpoints/; a resume on another corpus says so."""

import errno
import hashlib
import json
import os
import shutil

import pytest

from s2moe_ds.checkpoint import check_resumable, complete_tags, read_meta
from s2moe_ds.checkpoint import store
from s2moe_ds.config import ConfigError
from s2moe_ds.fileio import atomic_write_text
from s2moe_ds.train import lock as lock_mod

from ..harness import run_distributed
from ..runs import TEXT, _pretrain_worker

DS_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-rank run with complete checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("safety")
    (root / "corpus.txt").write_text(TEXT)
    run_distributed(_pretrain_worker, 2, (str(root / "corpus.txt"), str(root / "run"), str(root / "cache"),
                                          dict(max_steps=6, keep_checkpoints=3, eval_interval=0)))
    return root


def _copy_run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def _digests(folder):
    """{relative path: SHA-256} of every file under `folder`."""
    out = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _complete(folder, step, recorded=None):
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text(f"{step if recorded is None else recorded}\n")


# ------------------------------------------------------------------------------------ step folders


def test_only_step_folders_the_run_names_count_ordered_by_step(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    _complete(ckpt / "step99999999", 99999999)
    _complete(ckpt / "step100000000", 100000000)  # a ninth digit: newer, though it sorts first as a string
    _complete(ckpt / "step_best", 3)
    _complete(ckpt / "step00000009", 9, recorded=3)  # an older step copied under a newer name
    _complete(ckpt / "step0000012", 12)  # seven digits: not a name a save writes
    _complete(ckpt / "poisoned_step00000020", 20)
    _complete(ckpt / "superseded_step00000030", 30)
    (ckpt / "step00000040").mkdir()  # a save that was killed: no COMPLETE
    (ckpt / "latest").write_text("step100000000")
    assert complete_tags(str(ckpt)) == ["step100000000", "step99999999"]
    out = capsys.readouterr().out
    assert f"ignored {ckpt / 'step_best'}: not a step folder name" in out
    assert f"ignored {ckpt / 'step00000009'}: its COMPLETE records step '3', not 9" in out
    assert "step0000012" in out
    assert "poisoned_" not in out and "superseded_" not in out and "step00000040" not in out and "latest" not in out
    complete_tags(str(ckpt))
    assert capsys.readouterr().out == ""  # each ignored entry is named once


def test_a_save_sets_a_complete_folder_of_its_step_aside_and_replaces_only_an_incomplete_one(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    _complete(ckpt / "step00000006", 6)
    (ckpt / "step00000006" / "weights.pt").write_bytes(b"the earlier continuation's weights")
    before = _digests(ckpt / "step00000006")
    store._make_room(str(ckpt), "step00000006")
    assert not (ckpt / "step00000006").exists()
    assert _digests(ckpt / "superseded_step00000006") == before
    assert "set aside as" in capsys.readouterr().out
    (ckpt / "step00000009").mkdir()
    (ckpt / "step00000009" / "half-written.pt").write_bytes(b"x")
    store._make_room(str(ckpt), "step00000009")
    assert sorted(os.listdir(ckpt)) == ["superseded_step00000006"]


def _resume_worker(rank, world_size, text, out_dir, cache, max_steps):
    return _pretrain_worker(rank, world_size, text, out_dir, cache,
                            dict(max_steps=max_steps, resume=True, keep_checkpoints=3, eval_interval=0))


def test_a_copied_step_folder_leaves_resume_on_the_newest_step_and_every_folder_untouched(trained, tmp_path, capfd):
    run = _copy_run(trained, tmp_path)
    ckpt = run / "checkpoints"
    shutil.copytree(ckpt / "step00000003", ckpt / "step_best")
    shutil.copytree(ckpt / "step00000003", ckpt / "step00000009")
    # A recovery script an earlier version let DeepSpeed copy there, and a link under the other name.
    import deepspeed
    shutil.copyfile(os.path.join(os.path.dirname(deepspeed.__file__), "utils", "zero_to_fp32.py"), ckpt / DS_SCRIPTS[0])
    precious = tmp_path / "precious.txt"
    precious.write_text("not DeepSpeed's\n")
    os.symlink(precious, ckpt / DS_SCRIPTS[1])
    before = {name: _digests(ckpt / name) for name in ("step00000003", "step00000006", "step_best", "step00000009")}
    capfd.readouterr()

    final = run_distributed(_resume_worker, 2, (str(trained / "corpus.txt"), str(run), str(trained / "cache"), 7))
    out = capfd.readouterr().out

    assert f"resumed from {ckpt / 'step00000006'} at step 6" in out
    assert all(len(r["losses"]) == 1 for r in final)  # step 7 only
    assert f"ignored {ckpt / 'step_best'}" in out and f"ignored {ckpt / 'step00000009'}" in out
    assert {name: _digests(ckpt / name) for name in before} == before
    assert (ckpt / "latest").read_text() == "step00000007" and (ckpt / "step00000007" / "COMPLETE").exists()
    assert not os.path.lexists(ckpt / DS_SCRIPTS[0])
    assert os.path.islink(ckpt / DS_SCRIPTS[1]) and precious.read_text() == "not DeepSpeed's\n"


def test_deepspeeds_recovery_scripts_are_absent_after_a_save(trained):
    ckpt = trained / "run" / "checkpoints"
    for folder in (ckpt, ckpt / "step00000003", ckpt / "step00000006"):
        assert not set(DS_SCRIPTS) & set(os.listdir(folder)), os.listdir(folder)


def test_a_resume_on_another_corpus_says_the_data_differs(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    ckpt = str(run / "checkpoints")
    expect = read_meta(os.path.join(ckpt, "step00000006"))
    expect["tokenizer"] = dict(expect["tokenizer"], vocab_size=2, built_from="path train split (corpus 0123)",
                               sha256="0" * 64)
    expect["model_config"] = dict(expect["model_config"], vocab_size=2)
    with pytest.raises(ConfigError) as e:
        check_resumable(ckpt, expect, relayout_refusal="no")
    message = str(e.value)
    assert "trained on other data or another tokenizer" in message and "vocab_size" not in message
    assert f"--tokenizer {os.path.join(ckpt, 'step00000006', 'tokenizer.json')}" in message
    assert "new --out-dir" in message


# ------------------------------------------------------------------------------------ lock, atomic writes


def _lock_worker(rank, world_size, text, out_dir, cache):
    with pytest.raises(ConfigError) as e:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=3))
    return str(e.value)


def test_a_symlinked_lock_is_refused_and_its_target_left_unchanged(trained, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("someone's file\n")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(target, out / "LOCK")
    messages = run_distributed(_lock_worker, 2, (str(trained / "corpus.txt"), str(out), str(trained / "cache")))
    for message in messages:  # every rank stops with rank 0's reason
        assert f"{out / 'LOCK'} is a symbolic link (to {target})" in message and "remove that entry" in message
    assert target.read_text() == "someone's file\n"
    assert not (out / "checkpoints").exists()


def test_a_hard_linked_lock_is_refused(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("someone's file\n")
    (tmp_path / "run").mkdir()
    os.link(target, tmp_path / "run" / "LOCK")
    with pytest.raises(ConfigError, match="a hard link shared with 1 other name"):
        lock_mod.RunLock().try_acquire(str(tmp_path / "run"))
    assert target.read_text() == "someone's file\n"


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL])
def test_a_file_system_without_locks_is_named_with_the_fix(tmp_path, monkeypatch, code):
    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(lock_mod.fcntl, "flock", no_locks)
    fs_type, mount = lock_mod.file_system_of(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        lock_mod.RunLock().try_acquire(str(tmp_path / "run"))
    message = str(e.value)
    assert f"flock failed with {errno.errorcode[code]}" in message and "in use by another run" not in message
    assert f"on its {fs_type} file system (mounted at {mount})" in message
    assert "'nolock'" in message and "-o flock" in message


def test_only_ewouldblock_means_held(tmp_path, monkeypatch):
    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "held")
    monkeypatch.setattr(lock_mod.fcntl, "flock", held)
    assert lock_mod.RunLock().try_acquire(str(tmp_path / "run")).startswith("host ")


def test_atomic_write_through_a_planted_link_clobbers_nothing(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("someone's file\n")
    path = tmp_path / "latest"
    # The name the writer used to take (<path>.tmp.<pid>), and the destination itself, as links.
    os.symlink(target, f"{path}.tmp.{os.getpid()}")
    atomic_write_text(str(path), "step00000006")
    assert path.read_text() == "step00000006" and target.read_text() == "someone's file\n"
    link = tmp_path / "meta.json"
    os.symlink(target, link)
    atomic_write_text(str(link), "{}")
    assert not os.path.islink(link) and link.read_text() == "{}" and target.read_text() == "someone's file\n"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as a plain open would create it
    assert sorted(os.listdir(tmp_path)) == sorted(["target.txt", "latest", "meta.json", f"latest.tmp.{os.getpid()}"])


# ------------------------------------------------------------------------------------ consolidate


def _consolidate(*argv):
    from launch.consolidate import main
    return main([str(a) for a in argv])


def test_consolidate_never_writes_into_a_checkpoint(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    states = run / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt"
    before = _digests(run / "checkpoints")
    for out, extra in ((states, ["--force"]), (run / "checkpoints" / "model.pt", []),
                       (run / "checkpoints" / "step00000003" / "model.pt", ["--force"])):
        assert _consolidate(run, "--out", out, *extra) == 2
        err = capsys.readouterr().err
        assert "is inside the checkpoint folder" in err and "name a path outside checkpoints/" in err, err
    assert _digests(run / "checkpoints") == before


def test_consolidate_replaces_only_its_own_file_without_force(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path)
    out = tmp_path / "notes.pt"
    out.write_text("a file consolidate did not write\n")
    assert _consolidate(run, "--out", out) == 2
    assert "exists and is a file consolidate did not write" in capsys.readouterr().err
    assert out.read_text() == "a file consolidate did not write\n"
    assert _consolidate(run, "--out", out, "--force") == 0
    assert _consolidate(run, "--out", out) == 0  # its own file: replaced without --force
    import torch
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == "s2moe_ds consolidated model (fp32)" and blob["state_dict"]
    assert sorted(os.listdir(tmp_path)) == ["notes.pt", "run"]  # no temporary file left


@pytest.mark.parametrize("argv, expected", [
    (["--tag", "99"], r"--tag: .* holds no complete checkpoint '99' \(complete: step00000003, step00000006\)"),
    (["--tag", "step_best"], "--tag: .* holds no complete checkpoint 'step_best'"),
    (["--out", "{tmp}/missing/model.pt"], "--out: folder .*missing does not exist"),
    (["--out", "{tmp}"], "--out: .* is a folder; --format pt writes one file"),
])
def test_consolidate_names_a_bad_tag_or_out_before_reading_weights(trained, tmp_path, capsys, monkeypatch, argv,
                                                                  expected):
    import re

    import launch.consolidate as script

    def no_compute(*args, **kwargs):
        raise AssertionError("the weights were read before --tag and --out were checked")

    monkeypatch.setattr(script, "consolidate", no_compute if "--out" in argv else script.consolidate)
    argv = [a.format(tmp=tmp_path) for a in argv]
    args = ([str(trained / "run")] + (["--out", str(tmp_path / "m.pt")] if "--out" not in argv else []) + argv)
    assert script.main(args) == 2
    assert re.search(expected, capsys.readouterr().err)


def test_hf_export_leaves_folders_beside_its_output_alone(trained, tmp_path):
    pytest.importorskip("transformers")
    from s2moe_ds.checkpoint.output import HF_MODEL_TYPE
    from s2moe_ds.hf import S2MoEConfig
    assert HF_MODEL_TYPE == S2MoEConfig.model_type  # what consolidate knows its earlier export by
    out = tmp_path / "hf"
    for name in ("hf.old", "hf.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    assert _consolidate(trained / "run", "--format", "hf", "--out", out) == 0
    assert _consolidate(trained / "run", "--format", "hf", "--out", out) == 0  # over its own earlier export
    assert json.loads((out / "config.json").read_text())["model_type"] == "s2moe"
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf.old", "hf.tmp"]
    assert all((tmp_path / n / "keep.txt").read_text() == n for n in ("hf.old", "hf.tmp"))


# ------------------------------------------------------------------------------------ review of issue 24

@pytest.mark.parametrize("tokenizer", ["char", "subword"])  # ids written into a memory map / by np.save
def test_the_token_cache_writes_through_no_planted_link(tmp_path, tokenizer):
    """The cache's .npy files go through a new file of ours: a link at the temporary name the cache
    used to take (<split>.npy.tmp.<pid>) or at a split's own name leaves its target unchanged."""
    import numpy as np

    from s2moe_ds.data import DataConfig, prepare_corpus
    from s2moe_ds.data.cache import cache_folder
    from s2moe_ds.data.corpora import SPLITS, locate
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    kw = dict(dataset="path", path=str(corpus), tokenizer=tokenizer, subword_vocab_size=300)
    clean = prepare_corpus(DataConfig(cache_dir=str(tmp_path / "clean"), **kw))
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **kw)
    folder = cache_folder(cfg, locate(cfg))
    os.makedirs(folder)
    targets = {}
    for split in SPLITS:
        for link in (f"{split}.npy.tmp.{os.getpid()}", f"{split}.npy"):
            targets[link] = tmp_path / f"someone's {link}"
            targets[link].write_text("someone's file\n")
            os.symlink(targets[link], os.path.join(folder, link))
    prepared = prepare_corpus(cfg)
    assert all(target.read_text() == "someone's file\n" for target in targets.values())
    for split in SPLITS:
        assert not os.path.islink(os.path.join(folder, f"{split}.npy"))
        assert np.array_equal(prepared.splits[split], clean.splits[split])
    left = sorted(n for n in os.listdir(folder) if not n.endswith(f".tmp.{os.getpid()}"))
    assert left == sorted(["COMPLETE", "meta.json", "tokenizer.json"] + [f"{s}.npy" for s in SPLITS])


def test_latest_is_read_only_as_a_regular_file_holding_a_step_name(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    _complete(ckpt / "step00000003", 3)
    secret = tmp_path / "secret.txt"
    secret.write_text("step00000003 password=hunter2\n")
    os.symlink(secret, ckpt / "latest")
    with pytest.raises(ConfigError) as e:
        store.latest_tag(str(ckpt))
    assert f"{ckpt / 'latest'} is a symbolic link, not the file a save writes" in str(e.value)
    assert store.newest_verified(str(ckpt)) == "step00000003"
    os.remove(ckpt / "latest")
    shutil.copyfile(secret, ckpt / "latest")  # a regular file, but no step folder's name
    with pytest.raises(ConfigError, match="latest names no step folder") as e:
        store.latest_tag(str(ckpt))
    assert store.newest_verified(str(ckpt)) == "step00000003"
    out = capsys.readouterr().out
    assert "is a symbolic link" in out and "latest' names no step folder" in out
    assert "hunter2" not in out + str(e.value)
    (ckpt / "latest").write_text("step00000009")
    with pytest.raises(ConfigError, match="names step00000009, which is not a complete checkpoint"):
        store.latest_tag(str(ckpt))


def test_a_lock_that_is_a_folder_is_named_as_one(tmp_path):
    (tmp_path / "run" / "LOCK").mkdir(parents=True)
    with pytest.raises(ConfigError, match="the run lock .*LOCK is a folder; remove or rename it") as e:
        lock_mod.RunLock().try_acquire(str(tmp_path / "run"))
    assert "writable" not in str(e.value)


def _run_with_checkpoints(ckpt, last_saved):
    """What Trainer._set_aside_from needs of a trainer, on one process."""
    from types import SimpleNamespace
    return SimpleNamespace(ckpt_dir=str(ckpt), last_saved=last_saved,
                           _set_aside=lambda tags, why: store.set_aside(str(ckpt), tags, why) if tags else [])


@pytest.mark.parametrize("bad_from, poisoned", [(5, []), (4, ["step00000004"])],
                         ids=["non-finite weights after step 5", "non-finite loss at step 5"])
def test_only_the_runs_own_checkpoint_is_set_aside_as_poisoned(tmp_path, bad_from, poisoned):
    """A run resumed from step 2 saved step 4; step 6 is left from a continuation the resume did
    not take. Its weights are not this run's: it is superseded, not poisoned."""
    from s2moe_ds.train.trainer import Trainer
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _complete(ckpt / f"step{step:08d}", step)
    got, moved, advice = Trainer._set_aside_from(_run_with_checkpoints(ckpt, last_saved=4), bad_from)
    assert got == poisoned
    expected = ["step00000002", "superseded_step00000006"]
    expected += ["poisoned_step00000004"] if poisoned else ["step00000004"]
    assert sorted(os.listdir(ckpt)) == sorted(expected + ["latest"])
    assert moved[0].endswith("poisoned_step00000004" if poisoned else "superseded_step00000006")
    healthy = "step00000002" if poisoned else "step00000004"
    assert f"the last healthy checkpoint is {ckpt / healthy}" in advice
    assert (ckpt / "latest").read_text() == healthy


# ------------------------------------------------------------ consolidate and export (issue 24 review)


def _crafted_client(monkeypatch, script, **sizes):
    """consolidate() as the script calls it, with the checkpoint's model config altered."""
    real = script.consolidate

    def crafted(*args, **kwargs):
        state, client = real(*args, **kwargs)
        client = {**client, "model_config": {**client["model_config"], **sizes}}
        return state, client
    monkeypatch.setattr(script, "consolidate", crafted)


@pytest.mark.parametrize("fmt", ["hf", "pt"])
def test_consolidate_refuses_a_model_config_its_weights_do_not_fit(trained, tmp_path, capsys, monkeypatch, fmt):
    """A checkpoint whose recorded model_config asks for d_model 1e6 is refused (status 2, naming the
    field) before any model is built or file written, by both formats."""
    import launch.consolidate as script
    import s2moe_ds.models as models
    _crafted_client(monkeypatch, script, d_model=10 ** 6)
    if fmt == "hf":
        pytest.importorskip("transformers")
        import s2moe_ds.hf.modeling as modeling

        def no_build(*args, **kwargs):
            raise AssertionError("a model was built from the crafted config")
        monkeypatch.setattr(modeling, "build_model", no_build)
    out = tmp_path / ("hf" if fmt == "hf" else "m.pt")
    assert script.main([str(trained / "run"), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model_config.d_model=1000000 exceeds every dimension of the stored weights" in err, err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []
    assert models.build_model  # the real one is untouched for the other tests


def _export(trained, out):
    assert _consolidate(trained / "run", "--format", "hf", "--out", out) == 0


def test_loading_an_export_checks_its_config_against_its_weights(trained, tmp_path):
    """An export whose config.json was altered to d_model 1e6 is refused, naming config.json and the
    field, by the Auto classes (after import s2moe_ds.hf) and by lm_eval's model `s2moe`, before
    anything is built."""
    pytest.importorskip("transformers")
    import s2moe_ds.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from s2moe_ds.config import ConfigError
    from s2moe_ds.hf import S2MoEForCausalLM
    out = tmp_path / "hf"
    _export(trained, out)
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.s2moe_model["d_model"] < 10 ** 6
    cfg = json.loads((out / "config.json").read_text())
    cfg["s2moe_model"]["d_model"] = 10 ** 6
    (out / "config.json").write_text(json.dumps(cfg))
    expected = rf"{out / 'config.json'}: model_config.d_model=1000000 exceeds every dimension of the stored weights"
    for load in (AutoModelForCausalLM.from_pretrained, S2MoEForCausalLM.from_pretrained):
        with pytest.raises(ConfigError, match=expected):
            load(str(out))
    pytest.importorskip("lm_eval")
    import s2moe_ds.hf.lm_eval  # noqa: F401
    from lm_eval.api.registry import get_model
    with pytest.raises(ConfigError, match=expected):
        get_model("s2moe")(pretrained=str(out), dtype="float32", device="cpu", batch_size=1)
    (out / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(out))


def test_hf_export_replaces_only_a_folder_of_its_own_files(trained, tmp_path, capsys):
    """Re-exporting over an earlier export to which someone added results or notes is refused, naming
    them; nothing is deleted. Every file an export writes (with the shims) is one it may replace."""
    pytest.importorskip("transformers")
    from s2moe_ds.checkpoint.output import HF_EXPORT_FILES
    out = tmp_path / "hf"
    assert _consolidate(trained / "run", "--format", "hf", "--out", out, "--remote-code-shims") == 0
    assert set(os.listdir(out)) <= HF_EXPORT_FILES, os.listdir(out)
    assert _consolidate(trained / "run", "--format", "hf", "--out", out) == 0
    (out / "results").mkdir()
    (out / "results" / "lm_eval.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    before = _digests(out)
    capsys.readouterr()
    assert _consolidate(trained / "run", "--format", "hf", "--out", out) == 2
    err = capsys.readouterr().err
    assert "holds an earlier export and also notes.txt, results (2 entries no export of ours writes" in err, err
    assert "name another --out" in err
    assert _digests(out) == before and sorted(os.listdir(tmp_path)) == ["hf"]


def test_consolidate_names_an_unwritable_out_and_leaves_no_temporary_folder(trained, tmp_path, capsys, monkeypatch):
    """--out in a folder that refuses writes (checked first; a failure while writing, as on /proc/sys
    for root, is named too); a failed save_pretrained leaves no hidden folder behind; a non-ASCII
    digit --tag and a FIFO named `latest` above --out get a message, not a traceback or a hang."""
    import launch.consolidate as script
    from s2moe_ds.checkpoint import output
    monkeypatch.setattr(output, "check_output_folder", lambda *a: None)  # as root on /proc/sys: access() says yes
    if os.path.isdir("/proc/sys/kernel"):
        assert script.main([str(trained / "run"), "--out", "/proc/sys/kernel/model.pt"]) == 2
        assert "--out: could not write /proc/sys/kernel/model.pt" in capsys.readouterr().err
    monkeypatch.undo()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: os.path.realpath(path) != str(readonly))
    assert script.main([str(trained / "run"), "--out", str(readonly / "m.pt")]) == 2
    assert f"--out: folder {readonly} is not writable" in capsys.readouterr().err
    monkeypatch.undo()
    pytest.importorskip("transformers")
    from s2moe_ds.hf import S2MoEForCausalLM

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(S2MoEForCausalLM, "save_pretrained", full_disk)
    assert script.main([str(trained / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "--out: could not write" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["readonly"]  # no '.hf.<random>.tmp' left
    monkeypatch.undo()
    assert script.main([str(trained / "run"), "--tag", "²", "--out", str(tmp_path / "m.pt")]) == 2
    assert "holds no complete checkpoint '²'" in capsys.readouterr().err
    os.mkfifo(tmp_path / "latest")
    assert script.main([str(trained / "run"), "--out", str(tmp_path / "m.pt")]) == 0  # did not block on the FIFO
