"""Bad inputs are named before any compute, with the flag or file and the fix (issue 24 item 7):
a step folder's manifest must list exactly its regular files by base name, with sizes and SHA-256s
of the right types; a hand-edited meta.json; a crafted or truncated torch file; data files that
are not UTF-8, have an empty label or no rows, are folders, FIFOs or devices, or cannot be read;
output folders that cannot be written; and a data file whose reads block (a FIFO, a hung mount),
which ends every rank within the hang bound instead of keeping them waiting."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import pytest
import torch

from s2moe_ds.checkpoint import MANIFEST, UnsafeCheckpointError, load_file, read_meta
from s2moe_ds.checkpoint import manifest
from s2moe_ds.checkpoint.manifest import CorruptCheckpointError, digests, write_manifest
from s2moe_ds.config import ConfigError
from s2moe_ds.data import ByteTokenizer, ClassificationDataConfig, DataConfig, load_classification
from s2moe_ds.parallel import free_port

from ..harness import run_distributed
from .test_pretrain import TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
OLD_STEP = os.path.join(ROOT, "tests", "data", "pre_redesign", "s2moe", "checkpoints", "step00000002")


# ------------------------------------------------------------------------------------ manifests

@pytest.fixture
def step(tmp_path):
    """A step folder as a save leaves it: files, a manifest of them, COMPLETE."""
    folder = tmp_path / "step00000004"
    folder.mkdir()
    for name, data in (("mp_rank_00_model_states.pt", b"weights" * 100), ("rng_rank0.pt", b"rng"),
                       ("meta.json", b"{}")):
        (folder / name).write_bytes(data)
    write_manifest(str(folder), digests(str(folder), ("COMPLETE",)))
    (folder / "COMPLETE").write_text("4\n")
    return folder


def _edit_manifest(folder, edit):
    obj = json.loads((folder / MANIFEST).read_text())
    edit(obj)
    (folder / MANIFEST).write_text(json.dumps(obj))


def _refused(folder, *parts):
    """The folder is refused, with a message holding every part (and no traceback)."""
    with pytest.raises(CorruptCheckpointError) as e:
        manifest.verify(str(folder))
    for part in parts:
        assert part in str(e.value), str(e.value)
    return str(e.value)


def test_a_sound_folder_verifies_and_one_without_manifest_still_loads(step):
    manifest.verify(str(step))
    assert manifest.problems(OLD_STEP) == []  # format 1: no manifest, still read
    assert read_meta(OLD_STEP)["format_version"] == 2


def test_an_empty_manifest_is_refused(step):
    _edit_manifest(step, lambda m: m.update(files={}))
    _refused(step, MANIFEST, "lists no file")


def test_a_file_the_manifest_does_not_list_is_refused(step):
    (step / "layer_0_expert_9_mp_rank_00_model_states.pt").write_bytes(b"extra")
    _refused(step, "layer_0_expert_9_mp_rank_00_model_states.pt: not in the manifest", "remove the file")
    os.remove(step / "layer_0_expert_9_mp_rank_00_model_states.pt")
    _edit_manifest(step, lambda m: m["files"].pop("rng_rank0.pt"))  # an entry dropped: the file is unlisted
    _refused(step, "rng_rank0.pt: not in the manifest")


@pytest.mark.parametrize("name", ["../mp_rank_00_model_states.pt", "/etc/passwd", "sub/rng_rank0.pt", "..", ".",
                                  "a\\b", "COMPLETE", MANIFEST, ""])
def test_names_that_are_no_plain_file_of_the_folder_are_refused(step, name):
    _edit_manifest(step, lambda m: m["files"].update({name: {"size": 3, "sha256": "0" * 64}}))
    _refused(step, MANIFEST, f"entry {name!r}")


@pytest.mark.parametrize("entry,why", [({"size": "21", "sha256": "0" * 64}, "not a non-negative integer"),
                                       ({"size": -1, "sha256": "0" * 64}, "not a non-negative integer"),
                                       ({"size": True, "sha256": "0" * 64}, "not a non-negative integer"),
                                       ({"size": 3, "sha256": "A" * 64}, "64 lowercase hexadecimal"),
                                       ({"size": 3, "sha256": "0" * 63}, "64 lowercase hexadecimal"),
                                       ({"size": 3}, "64 lowercase hexadecimal"),
                                       ([3, "0" * 64], "not an object")])
def test_entries_of_the_wrong_type_are_named_not_a_traceback(step, entry, why):
    _edit_manifest(step, lambda m: m["files"].update({"rng_rank0.pt": entry}))
    _refused(step, MANIFEST, "'rng_rank0.pt'", why)


@pytest.mark.parametrize("content,why", [(b"[]", "no object 'files'"), (b'{"files": []}', "no object 'files'"),
                                         (b"{not json", "not JSON"), (b"\xff\xfe", "not JSON")])
def test_a_manifest_that_is_no_manifest_is_refused(step, content, why):
    (step / MANIFEST).write_bytes(content)
    _refused(step, MANIFEST, why, "restore")


def test_links_and_fifos_in_a_step_folder_are_refused_unopened(step, tmp_path):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"rng")
    os.remove(step / "rng_rank0.pt")
    os.symlink(outside, step / "rng_rank0.pt")  # same bytes, but it could point anywhere
    _refused(step, "rng_rank0.pt: a symlink, not a regular file")
    os.remove(step / "rng_rank0.pt")
    os.mkfifo(step / "rng_rank0.pt")  # hashing it would block: it must not be opened
    _refused(step, "rng_rank0.pt: a FIFO")
    os.remove(step / "rng_rank0.pt")
    (step / "rng_rank0.pt").write_bytes(b"rng")
    os.mkdir(step / "extra")
    _refused(step, "extra: a folder")
    with pytest.raises(OSError, match="extra: a folder"):  # a save never lists what cannot verify
        digests(str(step), ("COMPLETE",))


def test_deepspeeds_recovery_scripts_are_written_beside_the_step_folders(tmp_path):
    """zero_to_fp32.py goes into checkpoints/, not into a step folder, so the manifest's exact
    listing does not meet it (DeepSpeed's engine copies it to the save_dir it is given)."""
    import inspect
    from deepspeed.runtime.engine import DeepSpeedEngine
    source = inspect.getsource(DeepSpeedEngine._save_zero_checkpoint)
    assert "self._copy_recovery_script(save_path)" in source
    assert "def _save_zero_checkpoint(self, save_path, tag)" in source  # save_path: the parent, tag: the folder


# ---------------------------------------------------------------------------- meta.json, torch files

@pytest.fixture
def meta_step(tmp_path):
    folder = tmp_path / "step00000002"
    shutil.copytree(OLD_STEP, folder)
    return folder


@pytest.mark.parametrize("edit,parts", [
    (lambda m: m.update(world_size="2"), ["'world_size' is '2', not a positive integer"]),
    (lambda m: m.update(ep_size=0), ["'ep_size' is 0"]),
    (lambda m: m.pop("model_config"), ["has no 'model_config'"]),
    (lambda m: m.update(tokenizer=[1]), ["'tokenizer' is list, not an object"]),
    (lambda m: m["tokenizer"].update(vocab_size="29"), ["'tokenizer.vocab_size' is '29'"]),
    (lambda m: m["model_config"].update(moe="s2moe"), ["its model config (or its 'moe') is not an object"]),
    (lambda m: m["model_config"].update(d_model="16"), ["its model config cannot be read"]),
], ids=["world_size", "ep_size", "missing", "tokenizer", "vocab_size", "moe", "d_model"])
def test_a_hand_edited_meta_json_is_named(meta_step, edit, parts):
    meta = json.loads((meta_step / "meta.json").read_text())
    edit(meta)
    (meta_step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as e:
        read_meta(str(meta_step))
    for part in [str(meta_step), *parts]:
        assert part in str(e.value), str(e.value)


@pytest.mark.parametrize("content,part", [(b"{", "is not JSON"), (b"[1, 2]", "holds list, not an object"),
                                          (b"\xff", "is not JSON")])
def test_a_meta_json_that_is_no_object_is_named(meta_step, content, part):
    (meta_step / "meta.json").write_bytes(content)
    with pytest.raises(ConfigError, match="meta.json " + part):
        read_meta(str(meta_step))


class _System:
    def __reduce__(self):
        return os.system, ("true",)


class _Exec:
    def __reduce__(self):
        return exec, ("1",)


@pytest.mark.parametrize("payload,call", [(_System(), "posix.system"), (_Exec(), "builtins.exec")])
def test_a_crafted_file_is_refused_naming_the_file_and_the_call(tmp_path, payload, call):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": payload}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_file(str(path))
    message = str(e.value)
    assert message.startswith(f"checkpoint file {path}: refused to unpickle it: its pickle asks for {call},")
    assert "Weights only load failed" not in message and "weights_only" not in message


def test_a_truncated_or_empty_torch_file_is_named(tmp_path):
    path = tmp_path / "rng_rank0.pt"
    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ConfigError, match=rf"checkpoint file {path}: cannot be read .*truncated"):
        load_file(str(path))
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"checkpoint file {path}: cannot be read"):
        load_file(str(path))


# -------------------------------------------------------------------------------------- data files

def _load(path, **kw):
    return load_classification(ClassificationDataConfig(dataset="files", path=str(path), **kw), ByteTokenizer(), 64)


def _csv_folder(tmp_path, train: bytes):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_bytes(train)
    return folder


@pytest.mark.parametrize("train,parts", [
    ("text,label\ncaf\u00e9 ok,pos\nbad,neg\n".encode("latin-1"),
     ["train.csv is not UTF-8 text (byte 0xe9 at offset 14, line 2)", "iconv"]),
    (b"text,label\ngood,pos\nmeh,\nbad,neg\n", ["train.csv line 3: the label (column 'label') is empty",
                                                 "fill it in or remove the row"]),
    (b"text,label\ngood,pos\nmeh\nbad,neg\n", ["train.csv line 3: the label"]),
    (b"text,label\n", ["train.csv has a header line (text,label) but no rows"]),
    (b"", ["train.csv is empty", "header line"]),
], ids=["latin-1", "empty label", "short row", "header only", "empty"])
def test_bad_csv_files_are_named_with_the_line_and_the_fix(tmp_path, train, parts):
    with pytest.raises(ConfigError) as e:
        _load(_csv_folder(tmp_path, train))
    for part in parts:
        assert part in str(e.value), str(e.value)


def test_an_empty_or_missing_jsonl_label_is_refused(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": null}\n')
    with pytest.raises(ConfigError, match=r"train\.jsonl line 2: the label \(column 'label'\) is empty"):
        _load(folder)
    (folder / "train.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"train\.jsonl holds no examples"):
        _load(folder)


def test_folders_fifos_and_devices_passed_as_files_are_named(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    os.mkdir(tmp_path / "folder")
    os.mkfifo(tmp_path / "fifo")
    cases = [(dict(dataset="path", train_file=str(tmp_path / "folder"), valid_file=str(corpus), test_file=str(corpus)),
              "data.train_file: ", "is a folder, not a file; pass --train-file the file itself"),
             (dict(dataset="path", path=str(corpus), tokenizer=str(tmp_path / "folder")),
              "data.tokenizer: ", "is a folder, not a file; pass --tokenizer"),
             (dict(dataset="path", path=str(tmp_path / "fifo")), "data.path: ", "is a FIFO (named pipe), not a regular "
              "file: reading it could block for ever"),
             (dict(dataset="enwik8", path="/dev/zero"), "data.path: ", "/dev/zero is a character device")]
    for kw, field, part in cases:
        with pytest.raises(ConfigError) as e:
            DataConfig(cache_dir=str(tmp_path / "cache"), **kw)
        assert str(e.value).startswith(field) and part in str(e.value), str(e.value)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(TEXT)
    os.mkfifo(tmp_path / "texts" / "b.txt")
    with pytest.raises(ConfigError, match=r"data\.path: .*b\.txt is a FIFO"):
        DataConfig(dataset="path", path=str(tmp_path / "texts"))
    with pytest.raises(ConfigError, match=r"finetune\.data\.path: .*fifo is a FIFO"):
        load_classification(ClassificationDataConfig(dataset="shakespeare-speakers", path=str(tmp_path / "fifo")),
                            ByteTokenizer(), 64)


def test_a_read_only_file_system_is_named(tmp_path):
    """A read-only tmpfs mounted for the test (root in a container may; skipped where it may not)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        from s2moe_ds.data import prepare_corpus
        for field, flag, make in (("data.cache_dir", "--cache-dir", lambda p: prepare_corpus(DataConfig(cache_dir=p))),
                                  ("train.out_dir", "--out-dir", _train_setup)):
            with pytest.raises(ConfigError) as e:
                make(str(mount / "run"))
            assert str(e.value).startswith(f"{field}: folder {mount} (to create {mount / 'run'} in) is not writable "
                                           f"(a read-only file system); pass {flag} a folder"), str(e.value)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _train_setup(out_dir):
    """Trainer.setup up to its first check of the out-dir, which comes before any process group."""
    from s2moe_ds.train import ExperimentConfig, TrainConfig
    from s2moe_ds.train.trainer import Trainer
    from .test_pretrain import _ds_config
    Trainer(ExperimentConfig(train=TrainConfig(out_dir=out_dir)), _ds_config()).setup()


NOBODY = 65534


def _as_nobody(cases):
    """{name: the ConfigError's message, or 'accepted'} of each case run as an unprivileged user,
    in a forked child (root reads and writes everything; the venv's python is not theirs to run)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        out = {}
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            for name, make in cases.items():
                try:
                    make()
                    out[name] = "accepted"
                except ConfigError as e:
                    out[name] = str(e)
                except Exception as e:  # noqa: BLE001 - reported to the test
                    out[name] = f"{type(e).__name__}: {e}"
        finally:
            os.write(write, json.dumps(out).encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_unreadable_and_unwritable_paths_are_named_before_compute():
    """A corpus without read permission, a folder of someone else as --out-dir or --cache-dir."""
    from s2moe_ds.cli import experiment_from_args, pretrain_parser
    from s2moe_ds.data import prepare_corpus
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    root = tempfile.mkdtemp(prefix="s2moe-perm-")
    try:
        os.chmod(root, 0o755)
        for name, mode in (("secret.txt", 0o600), ("ok.txt", 0o644)):
            with open(os.path.join(root, name), "w") as f:
                f.write(TEXT)
            os.chmod(os.path.join(root, name), mode)
        os.mkdir(os.path.join(root, "closed"), 0o700)
        with open(os.path.join(root, "closed", "a.txt"), "w") as f:
            f.write(TEXT)
        os.mkdir(os.path.join(root, "theirs"), 0o755)
        os.mkdir(os.path.join(root, "mine"))
        os.chmod(os.path.join(root, "mine"), 0o777)
        got = _as_nobody({
            "unreadable --path": lambda: DataConfig(dataset="path", path=os.path.join(root, "secret.txt")),
            "unreadable folder": lambda: DataConfig(dataset="path", path=os.path.join(root, "closed")),
            "unwritable --out-dir": lambda: _train_setup(os.path.join(root, "theirs", "run")),
            # The preset's own out_dir (runs/tiny under an unwritable cwd) is no concern once --out-dir replaces it.
            "preset, writable --out-dir": lambda: (os.chdir(os.path.join(root, "theirs")), experiment_from_args(
                pretrain_parser().parse_args(["--preset", "tiny", "--out-dir", os.path.join(root, "mine", "run")]))),
            "unwritable --cache-dir": lambda: prepare_corpus(DataConfig(
                dataset="path", path=os.path.join(root, "ok.txt"), cache_dir=os.path.join(root, "theirs", "cache"))),
        })
        assert got["unreadable --path"].startswith("data.path: ") and \
            "secret.txt is not readable (permission denied); make it readable" in got["unreadable --path"], got
        assert got["unreadable folder"].startswith("data.path: folder ") and "closed is not readable" in \
            got["unreadable folder"], got
        assert got["unwritable --out-dir"].startswith("train.out_dir: folder ") and \
            "(to create" in got["unwritable --out-dir"] and "pass --out-dir a folder you can write to" in \
            got["unwritable --out-dir"], got
        assert got["preset, writable --out-dir"] == "accepted", got
        assert got["unwritable --cache-dir"].startswith("data.cache_dir: folder ") and \
            "not writable (permission denied); pass --cache-dir" in got["unwritable --cache-dir"], got
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------ reads that block

HANG = 6.0  # --hang-timeout-s of the blocked-read test


def _blocked_read_worker(rank, world_size, cfg):
    """rank 0 prepares the corpus (its file now a FIFO: open() blocks) while rank 1 waits, with
    the collective timeout init_distributed derives from --hang-timeout-s HANG."""
    import torch.distributed.distributed_c10d as c10d
    from s2moe_ds.train.collectives import rank_zero_first
    from s2moe_ds.data import prepare_corpus
    from s2moe_ds.train.watchdog import collective_timeout_s
    c10d.default_pg_timeout = timedelta(seconds=collective_timeout_s(HANG))
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        rank_zero_first(lambda: prepare_corpus(cfg), poll_s=1.0)
    return str(e.value), time.monotonic() - start


def test_a_data_file_whose_open_blocks_ends_every_rank_within_the_bound(tmp_path):
    """A file checked as regular that blocks when read (here it became a FIFO after the check; a
    hung network mount does the same): rank 0's read gives up within the collective timeout of
    --hang-timeout-s, and every rank fails with the file named."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    cfg = DataConfig(dataset="path", path=str(corpus), cache_dir=str(tmp_path / "cache"))
    os.remove(corpus)
    os.mkfifo(corpus)
    results = run_distributed(_blocked_read_worker, 2, (cfg,), timeout=120)
    bound = HANG * 1.05 + 5.0
    for message, seconds in results:
        assert f"data.path: opening {corpus} gave no data for {bound:.0f} s" in message, message
        assert "FIFO" in message and seconds < bound + 10, (message, seconds)


def test_a_fifo_path_is_refused_at_once_on_every_rank(tmp_path):
    """Two ranks of launch/pretrain.py, started as a launcher starts them (RANK, WORLD_SIZE...):
    each refuses the FIFO with status 2 before any process group, none waits for the other.
    (Under the deepspeed launcher the first rank's exit makes it kill the other.)"""
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    port = str(free_port())
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--deepspeed_config",
           os.path.join(ROOT, "ds_configs", "zero2.json"), "--preset", "tiny", "--dataset", "path", "--path",
           str(fifo), "--out-dir", str(tmp_path / "run"), "--hang-timeout-s", "15"]
    start = time.monotonic()
    ranks = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r),
                                       WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(2)]
    outputs = [p.communicate(timeout=240) for p in ranks]
    seconds = time.monotonic() - start
    for p, (out, err) in zip(ranks, outputs):
        assert p.returncode == 2, out[-2000:] + err[-2000:]
        assert err.startswith(f"error: data.path: {fifo} is a FIFO (named pipe), not a regular file"), err[-2000:]
    assert seconds < 60


# ------------------------------------------------------------------------------------ review of issue 24

def _unblock_later(fifo, seconds=20.0):
    """Should the code under test open the FIFO, a writer comes and goes after `seconds`: the test
    then fails on what was read instead of waiting for ever."""
    import threading

    def open_and_close():
        time.sleep(seconds)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing waits on it
            pass
    threading.Thread(target=open_and_close, daemon=True).start()


def test_a_meta_json_that_is_no_regular_file_is_named_unopened(meta_step, tmp_path):
    from s2moe_ds.train.finetune import pretrained_meta
    meta = meta_step / "meta.json"
    os.remove(meta)
    os.mkfifo(meta)
    _unblock_later(meta)
    start = time.monotonic()
    for read in (read_meta, pretrained_meta):  # --resume, finetune --pretrained <step folder>
        with pytest.raises(ConfigError, match="meta.json is a FIFO \\(named pipe\\), not a regular file"):
            read(str(meta_step))
    assert time.monotonic() - start < 10
    os.remove(meta)
    outside = tmp_path / "meta.json"
    shutil.copyfile(os.path.join(OLD_STEP, "meta.json"), outside)
    os.symlink(outside, meta)  # the right bytes, but a link could point anywhere
    with pytest.raises(ConfigError, match="meta.json is a symbolic link, not a regular file"):
        read_meta(str(meta_step))
    os.remove(meta)
    os.mkdir(meta)
    with pytest.raises(ConfigError, match="meta.json is a folder, not a regular file"):
        read_meta(str(meta_step))


def _folders_of_someone_else_worker(rank, world_size, ckpt):
    from s2moe_ds.checkpoint import CheckpointWriteError, complete_tags
    from s2moe_ds.checkpoint import store
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    tags = complete_tags(ckpt)
    with pytest.raises(CheckpointWriteError) as e:
        store.save(None, ckpt, 6, {}, keep=3)  # clearing the way fails before the engine is used
    return tags, str(e.value)


def test_checkpoint_folders_one_may_not_read_or_move_are_named(capfd):
    """Step folders of another user in checkpoints/: one whose COMPLETE cannot be read is ignored
    with a note naming the error; a save that must set one aside says to fix permissions."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    root = tempfile.mkdtemp(prefix="s2moe-perm-")
    try:
        os.chmod(root, 0o755)
        ckpt = os.path.join(root, "checkpoints")
        for step, mode in ((3, 0o755), (5, 0o700), (6, 0o755)):
            folder = os.path.join(ckpt, f"step{step:08d}")
            os.makedirs(folder)
            with open(os.path.join(folder, "COMPLETE"), "w") as f:
                f.write(f"{step}\n")
            os.chmod(folder, mode)
        with open(os.path.join(ckpt, "latest"), "w") as f:
            f.write("step00000006")
        [(tags, message)] = run_distributed(_folders_of_someone_else_worker, 1, (ckpt,))
        out = capfd.readouterr().out
        assert tags == ["step00000006", "step00000003"]
        assert (f"checkpoints: ignored {ckpt}/step00000005: its COMPLETE cannot be read (PermissionError: "
                "Permission denied)") in out, out
        step_dir = os.path.join(ckpt, "step00000006")
        assert message.startswith(f"checkpoint {step_dir}: writing failed on rank 0: clearing the earlier "
                                  f"{step_dir} out of the way: PermissionError"), message
        assert f"You may not move or remove {step_dir}: give yourself write permission" in message, message
        assert "Free space" not in message
        assert sorted(os.listdir(ckpt)) == ["latest", "step00000003", "step00000005", "step00000006"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
