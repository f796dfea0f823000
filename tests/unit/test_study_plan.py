"""The study's plans (s2moe_ds/experiments/plans.py), its submission bookkeeping with a stand-in
sbatch, and the rule that no comparison or study removes or overwrites a run folder that is another
command's or in use (s2moe_ds/experiments/runfolders.py)."""

import json
import os

import pytest

from s2moe_ds.config import ConfigError
from s2moe_ds.experiments import runner, study
from s2moe_ds.experiments.plans import PAPER_TASKS, PAPER_VARIANTS, Resources, paper_corpora, paper_plan
from s2moe_ds.experiments.runfolders import check_run_folder, flag_difference, write_record


def test_the_paper_grid_has_every_corpus_method_seed_and_task(tmp_path):
    plan = paper_plan(str(tmp_path), seeds=(1, 2, 3))
    cells = plan.cells()
    pretrain = [c for c in cells if c.kind == "pretrain"]
    finetune = [c for c in cells if c.kind == "finetune"]
    assert [c.name for c in paper_corpora()] == ["enwik8", "text8", "wikitext-103", "one-billion-word"]
    assert len(PAPER_VARIANTS) == 8 and len(pretrain) == 4 * 8 * 3
    assert len(finetune) == len(PAPER_TASKS) * 8 * 3 and set(PAPER_TASKS) == {"sst2", "sst5", "imdb", "banking77"}
    assert len({c.name for c in cells}) == len(cells)
    obw = paper_corpora()[3]
    skipped = [c for c in pretrain if c.skipped]
    # One Billion Word is skipped, with a note, only while the data package lacks it.
    assert len(skipped) == (0 if obw.dataset else 24) and bool(plan.notes) == (not obw.dataset)
    assert len(paper_plan(str(tmp_path), backbones=["txl", "gpt"]).pretrain_cells()) == 2 * 4 * 8 * 3


def test_each_pretraining_cell_has_the_papers_preset_batch_steps_and_its_variant(tmp_path):
    plan = paper_plan(str(tmp_path), seeds=(1, 2), backbones=["txl", "gpt"])
    cells = {c.name: c for c in plan.cells()}
    cell = cells["txl/enwik8/s2moe-xmoe/seed2"]
    env = dict(cell.env)
    assert env["PRESET"] == "txl-base" and env["DATASET"] == "enwik8" and env["SCRIPT"] == "launch/pretrain.py"
    assert env["DS_CONFIG"].endswith("txl_base_batch44.json")
    assert list(cell.flags) == ["--preset", "txl-base", "--dataset", "enwik8", "--seed", "2", "--max-steps", "100000",
                                "--eval-interval", "4000", "--save-interval", "100000", "--block", "s2moe", "--k", "2",
                                "--router", "xmoe"]
    # 8 GPUs per node do not divide WikiText-103's batch of 22: its jobs run 2 processes; enwik8's 4.
    assert cell.tasks == 4 and cells["txl/wikitext-103/smoe/seed1"].tasks == 2
    assert dict(cells["txl/wikitext-103/smoe/seed1"].env)["DS_CONFIG"].endswith("txl_base_batch22.json")
    gpt = cells["gpt/text8/smoe/seed1"]
    assert dict(gpt.env)["PRESET"] == "paper-small" and "--seq-len" in gpt.flags and "--lr" in gpt.flags
    ft = cells["finetune/imdb/txl/enwik8/s2moe-xmoe/seed2"]
    assert ft.after == cell.name and dict(ft.env)["PRETRAINED"] == plan.folder(cell)
    assert dict(ft.env)["SCRIPT"] == "launch/finetune.py" and dict(ft.env)["DATASET"] == "imdb"
    assert list(ft.flags) == ["--seed", "2", "--eval-k", "1", "2"]
    plan.write_configs(runner.ROOT)
    written = json.loads(open(plan.batch_config(22)).read())
    assert written["train_batch_size"] == 22 and written["optimizer"]["params"]["lr"] == 0.00035


def test_the_tiny_scale_is_the_same_grid_on_the_embedded_corpus(tmp_path):
    paper, tiny = paper_plan(str(tmp_path)), paper_plan(str(tmp_path), scale="tiny")
    assert [c.name for c in tiny.cells()] == [c.name for c in paper.cells()]
    cell = next(c for c in tiny.cells() if c.name == "txl/wikitext-103/smoe/seed1")
    assert dict(cell.env) == {"SCRIPT": "launch/pretrain.py", "PRESET": "txl-tiny", "DATASET": "embedded"}
    assert "--max-steps" in cell.flags and cell.flags[cell.flags.index("--max-steps") + 1] == "40"
    assert not any(c.skipped for c in tiny.cells())
    ft = next(c for c in tiny.cells() if c.kind == "finetune")
    assert dict(ft.env)["DATASET"] == "files" and "--max-steps" in ft.flags
    tiny.write_configs(runner.ROOT)
    rows = [json.loads(line) for line in open(tmp_path / "tiny_task" / "train.jsonl")]
    assert len(rows) == 120 and {r["label"] for r in rows} == {0, 1}


@pytest.mark.parametrize("kw, match", [
    (dict(corpora=["enwik9"]), "--corpora: unknown 'enwik9'"),
    (dict(variants=["smoe", "moe"]), "--variants: unknown 'moe'"),
    (dict(tasks=["sst3"]), "--tasks: unknown 'sst3'"),
    (dict(backbones=["rnn"]), "--backbones: unknown 'rnn'"),
    (dict(seeds=(1, 1)), "--seeds: \\[1, 1\\] must be distinct"),
    (dict(scale="huge"), "--scale: unknown scale 'huge'"),
    (dict(corpora=["text8"]), "--finetune-from: 'enwik8' is not a corpus of this plan"),
    (dict(max_steps=0), "--max-steps: must be >= 1"),
    (dict(data_paths=["enwik8"]), "--data-path: 'enwik8' is not NAME=PATH"),
    (dict(resources=Resources(nodes=3, gpus_per_node=8)), "--nodes/--tasks-per-node: 3 x 8 processes do not divide"),
])
def test_bad_selections_are_refused_naming_the_flag(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        paper_plan(str(tmp_path), **kw).cells()


def _tiny(tmp_path, **kw):
    return paper_plan(str(tmp_path / "study"), scale="tiny", seeds=(1, 2), corpora=["enwik8"],
                      variants=["smoe", "s2moe"], **kw)


def test_a_second_submission_submits_nothing_and_a_failed_cell_only_when_asked(tmp_path, monkeypatch):
    plan = _tiny(tmp_path, tasks=["sst2"])
    calls = []

    def sbatch(args, env):
        calls.append((args, env))
        return str(100 + len(calls))

    queued = {}
    monkeypatch.setattr(study, "scheduler_states", lambda jobs: {j: queued.get(j, ("", "")) for j in jobs})
    monkeypatch.setattr(study, "states", lambda p: [study.cell_state(p, c, queued) for c in p.cells()])
    assert study.submit(plan, sbatch=sbatch, log=lambda m: None) == 8
    ft_args = calls[4][0]
    assert "--dependency=afterok:101" in ft_args and calls[4][1]["SCRIPT"] == "launch/finetune.py"
    assert calls[0][1]["OUT_DIR"] == plan.folder(plan.cells()[0]) and calls[0][0][-len(plan.cells()[0].flags):] == \
        list(plan.cells()[0].flags)
    assert json.load(open(os.path.join(plan.folder(plan.cells()[0]), "command.json")))["jobs"] == ["101"]
    # Queued, running, or done: nothing is submitted again.
    queued.update({str(j): ("PENDING", "Priority") for j in range(101, 109)})
    queued["102"] = ("RUNNING", "None")
    open(os.path.join(plan.folder(plan.cells()[2]), "result.json"), "w").write("{}")
    assert study.submit(plan, sbatch=sbatch, log=lambda m: None) == 0
    states = {s.cell.name: s.state for s in study.states(plan)}
    assert states["txl/enwik8/smoe/seed2"] == "running" and states["txl/enwik8/s2moe/seed1"] == "done"
    # A job that ended without a result is failed: reported, and resubmitted only when named.
    del queued["101"]
    os.makedirs(os.path.join(plan.folder(plan.cells()[0]), "logs"))
    open(os.path.join(plan.folder(plan.cells()[0]), "slurm-101.out"), "w").write("boom: out of memory\n")
    said = []
    assert study.submit(plan, sbatch=sbatch, log=said.append) == 0
    assert "failed: txl/enwik8/smoe/seed1" in said[0] and "--resubmit txl/enwik8/smoe/seed1" in said[0]
    assert "boom: out of memory" in said[0]
    assert study.submit(plan, resubmit=["txl/enwik8/smoe/seed1"], sbatch=sbatch, log=lambda m: None) == 1
    record = json.load(open(os.path.join(plan.folder(plan.cells()[0]), "command.json")))
    assert record["jobs"] == ["101", "109"]
    with pytest.raises(ConfigError, match="--resubmit: no cell named 'nope'"):
        study.submit(plan, resubmit=["nope"], sbatch=sbatch)


def test_a_study_refuses_a_cell_folder_of_another_command_before_submitting_anything(tmp_path, monkeypatch):
    plan = _tiny(tmp_path, tasks=[])
    last = plan.cells()[-1]
    write_record(plan.folder(last), {"command": [*last.command()[:-1], "3"], "jobs": ["7"]})
    monkeypatch.setattr(study, "scheduler_states", lambda jobs: {})
    calls = []
    with pytest.raises(ConfigError, match=r"--out: run folder .*s2moe/seed2 holds a run of another command "
                                          r"\(--k: recorded 3, now 2\); it is not removed"):
        study.submit(plan, sbatch=lambda a, e: calls.append(a) or "1")
    assert calls == []


def test_a_differing_run_folder_is_refused_with_the_difference_and_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"command": ["launch/pretrain.py", "--max-steps", "4", "--seed", "1"]}))
    (run / "checkpoints").mkdir()
    with pytest.raises(ConfigError) as e:
        check_run_folder(str(run), ["launch/pretrain.py", "--max-steps", "8", "--seed", "1"])
    assert f"--out: run folder {run} holds a run of another command (--max-steps: recorded 4, now 8)" in str(e.value)
    assert "pass another --out, or remove that folder yourself" in str(e.value)
    assert (run / "checkpoints").is_dir() and (run / "result.json").exists()
    # The same command: the folder may be reused; a new or empty one is free.
    assert check_run_folder(str(run), ["launch/pretrain.py", "--max-steps", "4", "--seed", "1"])
    assert not check_run_folder(str(tmp_path / "new"), ["x"])
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "run_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds files but records no command"):
        check_run_folder(str(tmp_path / "foreign"), ["x"])
    assert flag_difference(["a", "--k", "2"], ["a", "--k", "2", "--fused"]) == ["--fused: recorded (absent), now (set)"]


def test_a_locked_run_folder_is_refused_even_with_the_same_command(tmp_path):
    from s2moe_ds.train.lock import RunLock
    run = tmp_path / "run"
    write_record(str(run), {"command": ["x", "--seed", "1"]})
    lock = RunLock()
    assert lock.try_acquire(str(run)) is None
    try:
        held = rf"run folder {run} is in use by a training run \(host .*, pid {os.getpid()}"
        with pytest.raises(ConfigError, match=held):
            check_run_folder(str(run), ["x", "--seed", "1"])
    finally:
        lock.release()
    assert check_run_folder(str(run), ["x", "--seed", "1"])  # released: the same command may go on


def test_the_sequential_harness_refuses_rather_than_removes(tmp_path):
    from s2moe_ds.train.lock import RunLock
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"command": ["--num_gpus", "2", "pretrain.py", "--seed", "1"]}))
    (run / "train.log").write_text("the old run's log\n")
    with pytest.raises(ConfigError, match=r"--seed: recorded 1, now 2"):
        runner.train_and_evaluate(["deepspeed", "--num_gpus", "2", "pretrain.py", "--seed", "2"], str(run), print)
    assert (run / "train.log").read_text() == "the old run's log\n"
    # An interrupted run of this very command is refused while a run holds its lock.
    other = tmp_path / "other"
    write_record(str(other), {"command": ["--num_gpus", "2", "pretrain.py", "--seed", "2"]})
    lock = RunLock()
    lock.try_acquire(str(other))
    try:
        with pytest.raises(ConfigError, match="is in use by a training run"):
            runner.train_and_evaluate(["deepspeed", "--num_gpus", "2", "pretrain.py", "--seed", "2"], str(other), print)
    finally:
        lock.release()
    assert (other / "command.json").exists() and (other / "LOCK").exists()


def test_status_and_tables_of_a_study_nothing_has_finished_in(tmp_path, monkeypatch):
    plan = _tiny(tmp_path, tasks=[])
    monkeypatch.setattr(study, "scheduler_states", lambda jobs: {})
    text = study.status_text(plan, study.states(plan))
    assert "4 not submitted" in text and "| txl/enwik8/smoe/seed1 | not submitted | - |" in text
    md = study.tables(plan, study.states(plan))
    assert "No finished run yet." in md and "Missing: smoe seed 1 (not submitted)" in md


def test_the_dry_run_states_jobs_and_gpu_hours(tmp_path):
    text = study.dry_run_text(paper_plan(str(tmp_path), corpora=["enwik8"], tasks=[]), tflops=10)
    assert "24 jobs to submit (24 pretraining, 0 fine-tuning" in text and "96 GPUs over all jobs" in text
    row = next(line for line in text.splitlines() if line.startswith("| txl | enwik8 |"))
    flops, per_run = float(row.split("|")[4]), float(row.split("|")[5])
    assert 1e17 < flops < 3e17 and per_run == pytest.approx(flops / 10e12 / 3600, rel=0.01)


def test_a_study_leaves_its_own_running_cell_alone_but_refuses_a_foreign_locked_one(tmp_path, monkeypatch):
    from s2moe_ds.train.lock import RunLock
    plan = _tiny(tmp_path, tasks=[])
    cell = plan.cells()[0]
    write_record(plan.folder(cell), {"command": cell.command(), "jobs": ["5"]})
    monkeypatch.setattr(study, "scheduler_states", lambda jobs: {"5": ("RUNNING", "None")})
    lock = RunLock()
    lock.try_acquire(plan.folder(cell))
    try:
        submitted = []
        assert study.submit(plan, sbatch=lambda a, e: submitted.append(a) or "9", log=lambda m: None) == 3
        assert all(plan.folder(cell) not in " ".join(a) for a in submitted)
        write_record(plan.folder(cell), {"command": [*cell.command(), "--fused"], "jobs": ["5"]})
        with pytest.raises(ConfigError, match="is in use by a training run"):
            study.submit(plan, sbatch=lambda a, e: "9", log=lambda m: None)
    finally:
        lock.release()


def test_a_fine_tuning_job_left_waiting_on_a_failed_pretraining_is_failed_and_replaced(tmp_path, monkeypatch):
    plan = _tiny(tmp_path, tasks=["sst2"])
    pre, ft = plan.cells()[0], next(c for c in plan.cells() if c.kind == "finetune")
    write_record(plan.folder(pre), {"command": pre.command(), "jobs": ["11"]})
    write_record(plan.folder(ft), {"command": ft.command(), "jobs": ["12"]})
    sched = {"12": ("PENDING", "DependencyNeverSatisfied")}
    monkeypatch.setattr(study, "scheduler_states", lambda jobs: sched)
    states = {s.cell.name: s for s in study.states(plan)}
    assert states[pre.name].state == "failed" and states[ft.name].state == "failed"
    assert states[ft.name].detail == f"job 12 waits on a failed job of {pre.name}"
    cancelled, calls = [], []
    study.submit(plan, resubmit=[pre.name, ft.name], sbatch=lambda a, e: calls.append(a) or str(20 + len(calls)),
                 cancel=cancelled.append, log=lambda m: None)
    ft_args = next(a for a in calls if plan.folder(ft) in " ".join(a))
    assert "12" in cancelled and "--dependency=afterok:21" in ft_args


def test_without_an_answer_from_the_scheduler_no_job_is_taken_for_ended(tmp_path, monkeypatch):
    plan = _tiny(tmp_path, tasks=[])
    cell = plan.cells()[0]
    write_record(plan.folder(cell), {"command": cell.command(), "jobs": ["11"]})
    monkeypatch.setattr(study, "_run", lambda cmd: None)  # squeue fails: no SLURM here, or slurmctld down
    states = {s.cell.name: s for s in study.states(plan)}
    assert states[cell.name].state == "unknown" and "squeue did not answer" in states[cell.name].detail
    said, calls = [], []
    study.submit(plan, retry_failed=True, sbatch=lambda a, e: calls.append(a) or "5", log=said.append)
    assert len(calls) == 3 and not any(plan.folder(cell) in " ".join(a) for a in calls)
    assert any("not submitted: txl/enwik8/smoe/seed1's job 11 may still run" in m for m in said)


def test_a_flag_neither_the_study_nor_pretraining_knows_is_refused(capsys):
    from s2moe_ds.cli import pretrain_parser
    assert study.main(["--plan", "paper", "--out", "unused", "--stauts", "--d-model", "32"], pretrain_parser) == 2
    assert "error: --stauts: neither launch/study.py's flag nor launch/pretrain.py's" in capsys.readouterr().err
