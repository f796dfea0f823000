"""Verified checkpoints (issue 17): every step folder carries a manifest of its files' sizes and
SHA-256, written before COMPLETE; a resume takes the newest folder that verifies and names what it
skipped (a truncated expert file, a missing RNG file, garbage in `latest`); evaluate and
consolidate name the damaged file; a full disk stops every rank with the path and keeps the
previous checkpoint and `latest`."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from s2moe_ds.checkpoint import MANIFEST, CheckpointWriteError, consolidate, latest_tag, manifest
from s2moe_ds.config import ConfigError

from ..harness import run_distributed
from .test_pretrain import TEXT, _pretrain_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-rank run with checkpoints at steps 3 and 6 (6 steps straight)."""
    root = tmp_path_factory.mktemp("integrity")
    (root / "corpus.txt").write_text(TEXT)
    straight = run_distributed(_pretrain_worker, 2, (str(root / "corpus.txt"), str(root / "run"), str(root / "cache"),
                                                     dict(max_steps=6, keep_checkpoints=3)))
    return root, straight


def _damaged_copy(root, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    damage(run / "checkpoints")
    return run


def _resume(root, run, max_steps=6):
    return run_distributed(_pretrain_worker, 2, (str(root / "corpus.txt"), str(run), str(root / "cache"),
                                                 dict(max_steps=max_steps, resume=True, keep_checkpoints=3)))


def test_every_file_is_in_the_manifest(runs):
    root, _ = runs
    for tag in ("step00000003", "step00000006"):
        step = root / "run" / "checkpoints" / tag
        files = json.loads((step / MANIFEST).read_text())["files"]
        on_disk = {n for n in os.listdir(step) if n not in ("COMPLETE", MANIFEST)}
        assert set(files) == on_disk and any("_expert_" in n for n in files)
        assert all(files[n]["size"] == os.path.getsize(step / n) for n in files)
        # DeepSpeed's recovery scripts go to checkpoints/, never into the exactly listed step folder.
        assert not on_disk & {"zero_to_fp32.py", "zero_to_torch.py"} and manifest.problems(str(step)) == []


def _truncate_expert(ckpt):
    victim = sorted(p for p in os.listdir(ckpt / "step00000006") if "_expert_" in p)[0]
    path = ckpt / "step00000006" / victim
    path.write_bytes(path.read_bytes()[:100])


def _drop_rng(ckpt):
    os.remove(ckpt / "step00000006" / "rng_rank1.pt")


def _flip_a_byte(ckpt):
    path = ckpt / "step00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,named", [(_truncate_expert, "bytes, the manifest says"),
                                          (_drop_rng, "rng_rank1.pt: missing"), (_flip_a_byte, "SHA-256")],
                         ids=["truncated", "missing", "altered"])
def test_each_kind_of_damage_is_found_and_named(runs, tmp_path, damage, named):
    root, _ = runs
    run = _damaged_copy(root, tmp_path, damage)
    with pytest.raises(Exception, match=r"step00000006 is damaged: .*" + re.escape(named)):
        consolidate(str(run / "checkpoints" / "step00000006"))
    assert consolidate(str(run))[1]["step"] == 3  # the run folder: the newest step that verifies


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(runs, tmp_path, capfd):
    root, straight = runs
    damage, named = _truncate_expert, "bytes, the manifest says"
    run = _damaged_copy(root, tmp_path, damage)
    resumed = _resume(root, run)
    out = capfd.readouterr().out
    assert "skipped step00000006" in out and named in out and "step00000003, the newest checkpoint that verifies" in out
    # Steps 4-6 again, exactly as the straight run took them.
    for rank in range(2):
        assert resumed[rank]["losses"] == pytest.approx(straight[rank]["losses"][3:], abs=1e-6)
    assert latest_tag(str(run / "checkpoints")) == "step00000006"


def test_garbage_in_latest_is_named_and_passed_over(runs, tmp_path, capfd):
    root, straight = runs
    run = _damaged_copy(root, tmp_path, lambda ckpt: (ckpt / "latest").write_bytes(b"\x00\xffgarbage"))
    resumed = _resume(root, run, max_steps=7)
    out = capfd.readouterr().out
    assert "latest' names" in out and "using" in out and "step00000006" in out
    assert len(resumed[0]["losses"]) == 1  # from step 6 to 7


def test_evaluate_and_consolidate_name_the_damaged_file(runs, tmp_path):
    root, _ = runs
    run = _damaged_copy(root, tmp_path, _truncate_expert)
    step = run / "checkpoints" / "step00000006"
    with pytest.raises(Exception, match=r"step00000006.*expert_.*bytes, the manifest says"):
        consolidate(str(step))
    for script, args in (("consolidate.py", [str(step), "--out", str(tmp_path / "m.pt")]),
                         ("evaluate.py", ["--checkpoint", str(step), "--splits", "valid"])):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and "expert_" in proc.stderr and "manifest" in proc.stderr, proc.stderr[-2000:]
    # A run folder: the newest step that verifies, saying what was skipped.
    state, client = consolidate(str(run))
    assert client["step"] == 3


def _raising_worker(rank, world_size, text, out_dir, cache, error, max_steps):
    """The run's error on this rank (the test fails if it trains through)."""
    with pytest.raises(error) as e:
        _pretrain_worker(rank, world_size, text, out_dir, cache, dict(max_steps=max_steps))
    return str(e.value)


def test_a_full_disk_stops_every_rank_and_keeps_the_previous_checkpoint(runs, tmp_path):
    root, _ = runs
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root / "run" / "checkpoints" / "step00000003")
             for f in fs]
    disk = tmp_path / "disk"
    disk.mkdir()
    # Room for one checkpoint and a half: the second save fills the disk.
    size_kib = int(sum(sizes) * 1.5 / 1024) + 64
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        messages = run_distributed(_raising_worker, 2, (str(root / "corpus.txt"), str(disk / "run"),
                                                        str(root / "cache"), CheckpointWriteError, 6))
        # Found before any rank wrote (the disk cannot hold another checkpoint of step 3's size), so no
        # rank is left in one of DeepSpeed's collectives by another's failed write.
        assert all("step00000006: writing failed on rank 0: its file system has" in m and "MiB free" in m
                   and "step00000003" in m and "unchanged" in m for m in messages), messages
        ckpt = disk / "run" / "checkpoints"
        assert latest_tag(str(ckpt)) == "step00000003" and not (ckpt / "step00000006").exists()
        consolidate(str(disk / "run"))  # the previous checkpoint verifies and loads
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_second_run_on_an_out_dir_is_refused_and_a_dead_holders_lock_is_taken_over(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from s2moe_ds.train.lock import RunLock; "
                               "lock = RunLock(); assert lock.try_acquire(sys.argv[1]) is None; print('held', flush=True); "
                               "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        messages = run_distributed(_raising_worker, 2, (str(root / "corpus.txt"), str(out), str(root / "cache"),
                                                        ConfigError, 3))
        assert all(f"pid {holder.pid}" in m and "in use by another run" in m for m in messages), messages
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()  # a crash: the kernel releases the lock with the process
        holder.wait()
    final = run_distributed(_pretrain_worker, 2, (str(root / "corpus.txt"), str(out), str(root / "cache"),
                                                  dict(max_steps=3)))
    assert final[0]["step"] == 3
