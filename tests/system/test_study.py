"""launch/study.py on a real single-node SLURM (tests/slurm_cluster.py): a 2-variant x 2-seed grid
at tiny size, one job preempted mid-run (it checkpoints, requeues and resumes), --status and
--table while jobs run, a second submission that submits nothing, and at the end the same table as
the sequential harness's evaluation (runner.evaluate_and_record) of the same run folders."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from s2moe_ds.experiments.compare import summary_table
from s2moe_ds.experiments.plans import paper_plan
from s2moe_ds.experiments.runner import evaluate_and_record

from ..slurm_cluster import SlurmCluster, running, why_unavailable
from .test_slurm import TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason=why_unavailable() or "")

STEPS = 100
VICTIM = "txl/enwik8/s2moe/seed1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running(SlurmCluster(str(tmp_path_factory.mktemp("slurm"))), cancel_jobs=True)


def _study(cluster, base, *more):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "study.py"), *base, *more],
                          capture_output=True, text=True, env=cluster.env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _finished(state):
    return state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def test_a_tiny_study_survives_preemption_and_gives_the_harness_table(cluster, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "study"
    base = ["--plan", "paper", "--scale", "tiny", "--out", str(out), "--variants", "smoe", "s2moe", "--seeds", "1",
            "2", "--corpora", "enwik8", "--tasks", "--data-path", f"enwik8={corpus}", "--tasks-per-node", "1",
            "--max-steps", str(STEPS),
            # passed through to launch/pretrain.py: a smaller model, every step logged, a private cache
            "--d-model", "32", "--d-inner", "64", "--seq-len", "32", "--max-seq-len", "32", "--log-interval", "1",
            "--cache-dir", str(tmp_path / "cache")]
    submitted = _study(cluster, base)
    assert "4 job(s) submitted" in submitted, submitted
    jobs = {name: json.loads((out / name / "command.json").read_text())["jobs"][-1]
            for name in ("txl/enwik8/smoe/seed1", "txl/enwik8/smoe/seed2", VICTIM, "txl/enwik8/s2moe/seed2")}

    # Preempt the victim once it trains: SIGTERM to its tasks, as SLURM's preemption sends.
    logs = out / VICTIM / "logs"
    victim = jobs[VICTIM]
    cluster.wait(victim, lambda s: _finished(s) or any(
        "step " in p.read_text(errors="replace") for p in logs.glob("*rank0.log")), timeout=400)
    signalled = cluster.run("scancel", "--signal=TERM", victim)
    assert signalled.returncode == 0, signalled.stderr

    # While jobs still run: --status shows the grid with a running cell's step and ETA, --table
    # the finished cells with the others named, and a second submission submits nothing.
    seen_running = ""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not seen_running:
        status = _study(cluster, base, "--status")
        if re.search(r"\| running \| \d+ \| step \d+/100, eta \d+:\d\d:\d\d", status):
            seen_running = status
        elif "running" not in status and "queued" not in status:
            break
        time.sleep(1)
    assert seen_running, status
    partial = _study(cluster, base, "--table")
    assert "## txl on enwik8" in partial and "Missing: " in partial, partial
    again = _study(cluster, base)
    assert "0 job(s) submitted" in again and "submitted txl" not in again, again

    for job in jobs.values():
        state = cluster.wait(job, _finished, timeout=600)
        assert state["JobState"] == "COMPLETED", f"{state}\n{cluster.logs()}"
    assert cluster.job(victim).get("Restarts") == "1"
    first = next(logs.glob(f"job{victim}-restart0-rank0.log")).read_text(errors="replace")
    stopped = re.search(r"SIGTERM: checkpointed step (\d+), exiting for requeue", first)
    assert stopped and 0 < int(stopped.group(1)) < STEPS, first[-3000:]
    resumed = next(logs.glob(f"job{victim}-restart1-rank0.log")).read_text(errors="replace")
    assert "resumed from" in resumed, resumed[-3000:]

    status = _study(cluster, base, "--status")
    assert "4 done" in status, status
    table = _study(cluster, base, "--table")
    assert "Missing" not in table and (out / "study.md").read_text() in table

    # The sequential harness's evaluation of the same runs (on copies) gives the same table.
    plan = paper_plan(str(out), scale="tiny", seeds=(1, 2), corpora=["enwik8"], variants=["smoe", "s2moe"], tasks=[])
    results = {}
    for cell in plan.cells():
        copy = tmp_path / "harness" / cell.name
        shutil.copytree(out / cell.name, copy)
        (copy / "result.json").unlink()
        record = evaluate_and_record(str(copy), cell.command(), None, print, {"path": str(corpus)})
        results.setdefault(cell.variant, []).append({**record, "seed": cell.seed})
    harness = summary_table(plan.variants, results, "bpc", "smoe")
    assert harness in table, harness + "\n---\n" + table
    assert "| smoe | 2 |" in harness and "| s2moe | 2 |" in harness


def test_a_fine_tuning_cell_waits_for_its_pretraining_job_and_reaches_the_table(cluster, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "study"
    base = ["--plan", "paper", "--scale", "tiny", "--out", str(out), "--variants", "s2moe", "--seeds", "3",
            "--corpora", "enwik8", "--tasks", "sst2", "--data-path", f"enwik8={corpus}", "--tasks-per-node", "1",
            "--max-steps", "4", "--finetune-steps", "4", "--d-model", "32", "--d-inner", "64", "--seq-len", "32",
            "--max-seq-len", "32", "--cache-dir", str(tmp_path / "cache")]
    submitted = _study(cluster, base)
    assert "2 job(s) submitted" in submitted, submitted
    pretrain = json.loads((out / "txl/enwik8/s2moe/seed3" / "command.json").read_text())["jobs"][0]
    finetune_cell = out / "finetune/sst2/txl/enwik8/s2moe/seed3"
    finetune = json.loads((finetune_cell / "command.json").read_text())["jobs"][0]
    assert f"(after job {pretrain})" in submitted
    assert cluster.job(finetune).get("Dependency", "").startswith(f"afterok:{pretrain}")
    for job in (pretrain, finetune):
        state = cluster.wait(job, _finished, timeout=600)
        assert state["JobState"] == "COMPLETED", f"{state}\n{cluster.logs()}"
    report = json.loads((finetune_cell / "finetune_eval.json").read_text())
    assert report["pretrained"].startswith(str(out / "txl/enwik8/s2moe/seed3" / "checkpoints"))
    assert {(r["split"], r["eval_k"]) for r in report["results"]} >= {("valid", 1), ("valid", 2)}
    table = _study(cluster, base, "--table")
    assert "## fine-tuning on sst2, pretrained txl/enwik8" in table and "| s2moe | 1 |" in table, table
    assert "Missing" not in table, table
