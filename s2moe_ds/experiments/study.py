"""A study on a SLURM cluster: every cell of a plan (plans.py) one job, their state, their tables.

launch/study.py is the command line. Each cell is one `sbatch` of slurm/study_cell.sh, which runs
slurm/pretrain.sh with the cell's variables and flags (so a job checkpoints on a stop signal and
requeues itself), then, for pretraining, evaluates the finished run into result.json exactly as
launch/compare.py does (runner.evaluate_and_record). Plain sbatch, one job per cell rather than a
job array or submitit: each cell has its own flags, its own dependency (fine-tuning waits for its
pretraining with afterok) and may be resubmitted alone; and sbatch is on every SLURM cluster, so
the study adds no runtime dependency.

State lives in the run folders: each cell's command.json (written atomically) records its
command and the job ids submitted for it; result.json (pretraining) or finetune_eval.json
(fine-tuning) says it is done; logs/ and heartbeat/ say how far it got. The scheduler (squeue,
then sacct where accounting exists) says whether a job is queued or running. So a second
submission on the same --out submits nothing for a cell that is queued, running or done, and a
cell whose folder holds another command, or a run holding its lock, is refused, not replaced.
"""

import argparse
import fcntl
import functools
import getpass
import glob
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..config import ConfigError
from ..fileio import atomic_write_text
from ..tables import markdown_table
from .compare import per_seed_table, summary_table
from .plans import PAPER_TASKS, PLANS, SCALES, Cell, Plan, Resources
from .runfolders import flag_values, check_run_folder, lock_holder, read_record, write_record
from .runner import ROOT, evaluate_and_record

CELL_SCRIPT = os.path.join(ROOT, "slurm", "study_cell.sh")
DONE_FILE = {"pretrain": "result.json", "finetune": "finetune_eval.json"}
WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED", "STOPPED")
ACTIVE = ("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT")
ASSUMED_TFLOPS = 10.0
"""Sustained training throughput per GPU assumed by the GPU-hour estimate (--assume-tflops): an
H100 peaks near 989 TFLOP/s of dense bf16, but the paper's model (d_model 256, 11 sequences of 512
tokens per GPU) is bound by kernel launches and the all-to-all, so it keeps about 1% of that busy."""


@dataclass
class CellState:
    cell: Cell
    state: str
    """'skipped', 'not submitted', 'queued', 'running', 'done', 'failed', or 'unknown' (the
    scheduler did not answer)."""
    job: str = ""
    detail: str = ""
    tail: str = ""
    """A failed cell's last log lines."""


# ------------------------------------------------------------------------------------ scheduler

def _run(cmd: List[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def scheduler_states(jobs: Sequence[str]) -> Optional[Dict[str, Tuple[str, str]]]:
    """{job id: (state, reason)} for the jobs the scheduler still knows: squeue's, then sacct's
    (where accounting is kept) for jobs squeue has forgotten. None when squeue does not answer
    (no SLURM here, or its controller down): then no job can be said to have ended."""
    if not jobs:
        return {}
    queue = _run(["squeue", "-h", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%r"])
    if queue is None:
        return None
    states: Dict[str, Tuple[str, str]] = {}
    for line in queue.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in jobs:
            states[parts[0]] = (parts[1], parts[2])
    rest = [j for j in jobs if j not in states]
    if rest:
        accounted = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(rest), "-o", "JobID,State,ExitCode"])
        for line in (accounted or "").splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in rest:
                states[parts[0]] = (parts[1].split()[0], f"exit code {parts[2]}")
    return states


# ------------------------------------------------------------------------------------ run folders

def _tail(path: str, lines: int = 12) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _newest(pattern: str) -> Optional[str]:
    found = glob.glob(pattern)
    return max(found, key=os.path.getmtime) if found else None


STEP_LINE = re.compile(r"step (\d+)/(\d+) \|.*\| eta (\d+:\d\d:\d\d)")


def progress(folder: str) -> str:
    """'step 40/100, eta 0:01:02' from the newest rank-0 log's last step line, with the age of
    rank 0's heartbeat ('' before the first step)."""
    log = _newest(os.path.join(folder, "logs", "job*-rank0.log"))
    text = ""
    if log:
        found = STEP_LINE.findall(_tail(log, 200))
        if found:
            step, total, eta = found[-1]
            text = f"step {step}/{total}, eta {eta}"
    try:
        with open(os.path.join(folder, "heartbeat", "rank0.json")) as f:
            beat = json.load(f)
        text += f"{', ' if text else ''}heartbeat {time.time() - float(beat['alive']):.0f} s ago"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return text or "starting"


def cell_state(plan: Plan, cell: Cell, sched: Optional[Dict[str, Tuple[str, str]]]) -> CellState:
    """What a cell is now, from its run folder and the scheduler (None: it did not answer)."""
    if cell.skipped:
        return CellState(cell, "skipped", detail=cell.skipped)
    folder = plan.folder(cell)
    jobs = [str(j) for j in read_record(folder).get("jobs", [])]
    job = jobs[-1] if jobs else ""
    if os.path.isfile(os.path.join(folder, DONE_FILE[cell.kind])):
        return CellState(cell, "done", job)
    if not job:
        return CellState(cell, "not submitted")
    if sched is None:
        return CellState(cell, "unknown", job, "squeue did not answer: is SLURM reachable from here?")
    state, reason = sched.get(job, ("", ""))
    if reason == "DependencyNeverSatisfied":  # its pretraining job failed: this one would wait for ever
        return CellState(cell, "failed", job, f"job {job} waits on a failed job of {cell.after or 'another cell'}")
    if state in WAITING:
        why = f" ({reason})" if reason and reason != "None" else ""
        return CellState(cell, "queued", job, state.lower() + why)
    if state in ACTIVE:
        return CellState(cell, "running", job, progress(folder))
    why = f"job {job} {state.lower() if state else 'has left the scheduler'} without a result"
    logs = [os.path.join(folder, f"slurm-{job}.out"), _newest(os.path.join(folder, "logs", "job*-rank0.log"))]
    logs = [p for p in logs if p and os.path.isfile(p)]
    tail = "".join(f"==> {p} <==\n{_tail(p)}" for p in logs)
    return CellState(cell, "failed", job, why, tail)


def states(plan: Plan) -> List[CellState]:
    cells = plan.cells()
    jobs = [str(j) for c in cells for j in read_record(plan.folder(c)).get("jobs", [])[-1:]]
    sched = scheduler_states(jobs)
    return [cell_state(plan, c, sched) for c in cells]


# ------------------------------------------------------------------------------------ submission

def _sbatch(args: List[str], env: Dict[str, str]) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def cell_sbatch(plan: Plan, cell: Cell, dependency: Optional[str]) -> Tuple[List[str], Dict[str, str]]:
    """sbatch's arguments and environment for one cell."""
    folder = plan.folder(cell)
    args = [*plan.resources.sbatch_args(cell.tasks), "--job-name", "s2moe-" + cell.name.replace("/", "-"),
            "--output", os.path.join(folder, "slurm-%j.out")]
    if dependency:
        args.append(f"--dependency=afterok:{dependency}")
    env = {**os.environ, **dict(cell.env), "S2MOE_REPO": ROOT, "PYTHON": sys.executable, "OUT_DIR": folder}
    return [*args, CELL_SCRIPT, *cell.flags], env


def _scancel(job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True, timeout=60)


def submit(plan: Plan, retry_failed: bool = False, resubmit: Sequence[str] = (), dry_run: bool = False,
           log: Callable[[str], None] = print, sbatch: Callable[[List[str], Dict[str, str]], str] = _sbatch,
           cancel: Callable[[str], None] = _scancel) -> int:
    """Submit every cell that is not queued, running or done; a failed one only when named in
    `resubmit` or with retry_failed (a job of it still pending on a failed dependency is cancelled
    first). Returns the number of jobs submitted."""
    cells = {c.name: c for c in plan.cells()}
    unknown = [r for r in resubmit if r not in cells]
    if unknown:
        raise ConfigError(f"--resubmit: no cell named {', '.join(map(repr, unknown))} in this plan; --status lists "
                          "the cells")
    for cell in cells.values():  # every refusal before the first submission
        if not cell.skipped:
            check_run_folder(plan.folder(cell), cell.command(), "--out", running_ok=True)
    if not dry_run:
        plan.write_configs(ROOT)
    current = {s.cell.name: s for s in states(plan)}
    for name in resubmit:
        if current[name].state != "failed":
            log(f"not resubmitted: {name} is {current[name].state}, not failed")
    new_jobs: Dict[str, str] = {}
    submitted = 0
    for name, cell in cells.items():
        s = current[name]
        if s.state in ("skipped", "queued", "running", "done", "unknown"):
            if s.state == "unknown":
                log(f"not submitted: {name}'s job {s.job} may still run ({s.detail})")
            continue
        if s.state == "failed" and not (retry_failed or name in resubmit):
            log(f"failed: {name} ({s.detail}); resubmit it with --resubmit {name} or --retry-failed\n{s.tail}")
            continue
        dependency = None
        if cell.after:
            before = current[cell.after]
            dependency = new_jobs.get(cell.after) or (before.job if before.state in ("queued", "running") else None)
            if before.state != "done" and dependency is None:
                log(f"held: {name} waits for {cell.after}, which is {before.state}")
                continue
        holder = lock_holder(plan.folder(cell))
        if holder is not None:  # its last job left the scheduler, but a process of it still trains
            log(f"held: {name} is in use by a training run ({holder}); not resubmitted while it holds its lock")
            continue
        args, env = cell_sbatch(plan, cell, dependency)
        if dry_run:
            log(" ".join(f"{k}={v}" for k, v in cell.env) + " sbatch " + " ".join(args))
            new_jobs[name] = "DRYRUN"
            continue
        folder = plan.folder(cell)
        record = {**read_record(folder), "cell": name, "kind": cell.kind, "command": cell.command(),
                  "data": dict(cell.data)}
        write_record(folder, record)  # the folder is this cell's before its job exists
        if s.state == "failed" and s.job:
            cancel(s.job)  # one left pending on a failed dependency; a no-op for a job that ended
        job = sbatch(args, env)
        write_record(folder, {**record, "jobs": [*record.get("jobs", []), job]})
        new_jobs[name] = job
        submitted += 1
        log(f"submitted {name}: job {job}" + (f" (after job {dependency})" if dependency else ""))
    return submitted


class SubmitLock:
    """One submission at a time per --out (two at once could both see a cell unsubmitted)."""

    def __init__(self, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "study.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __enter__(self):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            raise ConfigError(f"--out: another study command is submitting into {os.path.dirname(self.path)} "
                              f"({self.path}); wait for it to finish") from e
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------------ reports

def status_text(plan: Plan, rows: Sequence[CellState]) -> str:
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    table = markdown_table(["cell", "state", "job", "detail"], [[r.cell.name, r.state, r.job or "-", r.detail or ""]
                                                                for r in rows])
    head = f"study {plan.name} ({plan.scale}) in {plan.out}: " + ", ".join(f"{n} {s}"
                                                                         for s, n in sorted(counts.items()))
    notes = "".join(f"note: {n}\n" for n in plan.notes)
    failed = "".join(f"\n{r.cell.name} failed: {r.detail}\n{r.tail}" for r in rows if r.state == "failed")
    return f"{head}\n{notes}\n{table}\n{failed}"


def _finetune_record(folder: str) -> Dict:
    with open(os.path.join(folder, "finetune_eval.json")) as f:
        return {"eval": json.load(f)}


def tables(plan: Plan, rows: Sequence[CellState]) -> str:
    """Markdown: per (backbone, corpus) the comparison's summary and per-seed tables from the
    finished cells, per task the fine-tuned accuracy; the cells not finished yet are named."""
    parts = [f"# Study {plan.name} ({plan.scale})\n"]
    parts += [f"Note: {n}\n" for n in plan.notes]
    groups: Dict[Tuple[str, str], List[CellState]] = {}
    for r in rows:
        groups.setdefault((r.cell.kind, *r.cell.group), []).append(r)
    for (kind, a, b), members in groups.items():
        results: Dict[str, List[Dict]] = {}
        for r in members:
            if r.state == "done":
                record = (_read_json(os.path.join(plan.folder(r.cell), "result.json")) if kind == "pretrain"
                          else _finetune_record(plan.folder(r.cell)))
                results.setdefault(r.cell.variant, []).append({**record, "seed": r.cell.seed})
        title = f"{a} on {b}" if kind == "pretrain" else f"fine-tuning on {a}, pretrained {b}"
        parts.append(f"## {title}\n")
        if results:
            metric = "accuracy" if kind == "finetune" else next(iter(results.values()))[0]["eval"]["metric"]
            reference = "smoe" if kind == "pretrain" and "smoe" in results else None
            parts.append(summary_table(plan.variants, results, metric, reference, expected=len(plan.seeds)) + "\n")
            parts.append("Per seed:\n\n" + per_seed_table(plan.variants, results, metric) + "\n")
        else:
            parts.append("No finished run yet.\n")
        missing = [f"{r.cell.variant} seed {r.cell.seed} ({r.state}{', ' + r.detail if r.detail else ''})"
                   for r in members if r.state != "done"]
        if missing:
            parts.append("Missing: " + "; ".join(missing) + "\n")
    return "\n".join(parts)


def _read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def gpu_hours(plan: Plan, tflops: float = ASSUMED_TFLOPS) -> List[List[str]]:
    """Rows (backbone, corpus, runs, FLOPs per run, GPU-hours per run, GPU-hours) of the
    pretraining's estimated cost: 3x forward FLOPs per token (s2moe_ds/eval/flops.py) x tokens
    per step x steps, over `tflops` sustained per GPU."""
    from ..eval.flops import flops_per_token
    from ..train.presets import PRESETS, model_preset
    from .plans import BACKBONE_PRESETS
    rows = []
    # Vocabularies of the default tokenizers: bytes, text8's 27 characters and the unknown symbol, the
    # subword BPE of WikiText-103, One Billion Word's words (about 793k).
    vocab = {"enwik8": 256, "text8": 28, "wikitext-103": 16384, "one-billion-word": 793_000}
    for backbone in plan.backbones:
        preset = BACKBONE_PRESETS[plan.scale][backbone]
        seq = 512 if plan.scale == "paper" else PRESETS[preset]().train.seq_len
        for corpus in plan.corpora:
            total = 0.0
            for v in plan.variants:
                cfg = model_preset(preset, vocab_size=vocab.get(corpus.name, 256), moe=v.moe_dict())
                total += flops_per_token(cfg, seq, training=True)["total"] * corpus.batch * seq * plan.max_steps
            per_run = total / len(plan.variants)
            hours = per_run / (tflops * 1e12) / 3600
            runs = len(plan.variants) * len(plan.seeds)
            rows.append([backbone, corpus.name + (" (skipped)" if corpus.note and plan.scale == "paper" else ""),
                         str(runs), f"{per_run:.3g}", f"{hours:.2f}", f"{hours * runs:.1f}"])
    return rows


def dry_run_text(plan: Plan, tflops: float = ASSUMED_TFLOPS) -> str:
    cells = plan.cells()
    live = [c for c in cells if not c.skipped]
    gpus = sum(plan.resources.nodes * c.tasks for c in live) if plan.resources.gpus_per_node else 0
    head = (f"plan {plan.name} ({plan.scale}): {len(cells)} cells, {len(live)} jobs to submit "
            f"({sum(c.kind == 'pretrain' for c in live)} pretraining, {sum(c.kind == 'finetune' for c in live)} "
            f"fine-tuning after their pretraining), {plan.resources.nodes} node(s) each, "
            f"{gpus} GPUs over all jobs\n")
    notes = "".join(f"note: {n}\n" for n in plan.notes)
    cost = markdown_table(["backbone", "corpus", "runs", "FLOPs per run", "GPU-hours per run", "GPU-hours"],
                          gpu_hours(plan, tflops))
    return (f"{head}{notes}\nPretraining cost, estimated at {tflops:g} TFLOP/s sustained per GPU "
            f"(an assumption; FLOPs from s2moe_ds/eval/flops.py):\n\n{cost}\n")


# ------------------------------------------------------------------------------------ in the job

def finish(folder: str, log: Callable[[str], None] = print) -> int:
    """Run by slurm/study_cell.sh after slurm/pretrain.sh: a pretraining cell whose final
    checkpoint is complete is evaluated into result.json (as launch/compare.py does); one that
    stopped early (it checkpointed and requeued itself) is left for its next start."""
    record = read_record(folder)
    if record.get("kind") != "pretrain":
        return 0
    command = [str(w) for w in record.get("command", [])]
    steps = int(flag_values(command).get("--max-steps", ["0"])[-1])
    if not os.path.isfile(os.path.join(folder, "checkpoints", f"step{steps:08d}", "COMPLETE")):
        log(f"{folder}: no complete checkpoint of step {steps} yet; not evaluating")
        return 0
    if os.path.isfile(os.path.join(folder, "result.json")):
        return 0
    evaluate_and_record(folder, command, None, log, record.get("data") or None)
    log(f"{folder}: evaluated into result.json")
    return 0


# ------------------------------------------------------------------------------------ command line

def study_parser(width: Optional[int] = None) -> argparse.ArgumentParser:
    """launch/study.py's flags; `width` fixes the help's width (docs/cli.md)."""
    formatter = functools.partial(argparse.HelpFormatter, width=width) if width else argparse.HelpFormatter
    p = argparse.ArgumentParser(prog="launch/study.py", formatter_class=formatter, description=(
        "Submit a study's every run as a SLURM job (slurm/study_cell.sh running slurm/pretrain.sh), follow them, "
        "and write the comparison tables from what has finished (docs/evaluation.md). Flags it does not know "
        "pass through to every pretraining run."))
    p.add_argument("--plan", default="paper", choices=sorted(PLANS), help="(default: paper)")
    p.add_argument("--scale", default="paper", choices=SCALES, help="paper: the presets and budget of the "
                   "paper; tiny: the same grid at CPU size on the embedded corpus (default: paper)")
    p.add_argument("--out", required=True, help="the study's folder: one run folder per cell, the tables")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="(default: 1 2 3)")
    p.add_argument("--backbones", nargs="+", default=None, help="txl (txl-base, default) and/or gpt (paper-small)")
    p.add_argument("--corpora", nargs="+", default=None,
                   help="enwik8 text8 wikitext-103 one-billion-word (default: all)")
    p.add_argument("--variants", nargs="+", default=None, help="(default: the paper's eight)")
    p.add_argument("--tasks", nargs="*", default=None, help=f"fine-tuning tasks (default: {' '.join(PAPER_TASKS)}; "
                   "none: no fine-tuning)")
    p.add_argument("--finetune-from", default="enwik8", help="the corpus whose runs are fine-tuned (default: enwik8)")
    p.add_argument("--max-steps", type=int, default=None, help="(default: 100000; 40 at tiny scale)")
    p.add_argument("--finetune-steps", type=int, default=None, help="(default: launch/finetune.py's; 10 at tiny scale)")
    p.add_argument("--data-path", action="append", default=[], metavar="CORPUS=PATH",
                   help="a local copy of a corpus (at tiny scale: a text file that stands in for it)")
    p.add_argument("--task-path", action="append", default=[], metavar="TASK=PATH", help="a local copy of a task")
    p.add_argument("--nodes", type=int, default=1, help="nodes per job (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="(default: 8; 0 at tiny scale: no GPU asked)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="processes per node (default: the GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="(default: 8; 1 at tiny scale)")
    p.add_argument("--time", default=None, help="each job's time limit, e.g. 24:00:00 (requeues continue it)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch", action="append", default=[], metavar="ARG", help="another sbatch argument (repeatable)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="print every cell's state and submit nothing")
    what.add_argument("--table", action="store_true", help="write OUT/NAME.md from the finished cells")
    what.add_argument("--dry-run", action="store_true", help="print the jobs and the estimated cost; submit nothing")
    p.add_argument("--assume-tflops", type=float, default=ASSUMED_TFLOPS,
                   help=f"sustained TFLOP/s per GPU for --dry-run's GPU-hour estimate (default: {ASSUMED_TFLOPS:g})")
    p.add_argument("--retry-failed", action="store_true", help="resubmit every failed cell")
    p.add_argument("--resubmit", action="append", default=[], metavar="CELL", help="resubmit this failed cell")
    p.add_argument("--name", default="study", help="tables file OUT/NAME.md (default: study)")
    return p


def check_pass_through(extra: Sequence[str], pretrain_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """The flags passed through to every pretraining run must be launch/pretrain.py's (its parser,
    s2moe_ds.cli.pretrain_parser, which the launch script hands in: cli imports this package): a
    typo (--stauts) is refused here, not in every job."""
    unknown = [w for w in pretrain_parser().parse_known_args(list(extra))[1] if w.startswith("-")]
    if unknown:
        raise ConfigError(f"{' '.join(unknown)}: neither launch/study.py's flag nor launch/pretrain.py's; see "
                          "launch/study.py --help and launch/pretrain.py --help")


def build_plan(args, extra: Sequence[str]) -> Plan:
    """The plan launch/study.py's flags name, checked before anything is submitted."""
    tiny = args.scale == "tiny"
    for flag in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "max_steps", "finetune_steps"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "gpus_per_node" else 1):
            least = 0 if flag == "gpus_per_node" else 1
            raise ConfigError(f"--{flag.replace('_', '-')}: must be >= {least}, got {value}")
    resources = Resources(args.nodes, args.gpus_per_node if args.gpus_per_node is not None else (0 if tiny else 8),
                          args.tasks_per_node, args.cpus_per_task or (1 if tiny else 8), args.time, args.partition,
                          args.account, tuple(args.sbatch))
    return PLANS[args.plan](args.out, args.scale, args.seeds, args.backbones, args.corpora, args.variants, args.tasks,
                            args.finetune_from, args.max_steps, resources, args.data_path, args.task_path, extra,
                            args.finetune_steps)


def main(argv: Optional[Sequence[str]] = None,
         pretrain_parser: Optional[Callable[[], argparse.ArgumentParser]] = None) -> int:
    """launch/study.py: flags it does not know pass through to every pretraining run (checked
    against `pretrain_parser` when given)."""
    args, extra = study_parser().parse_known_args(argv)
    try:
        if pretrain_parser is not None:
            check_pass_through(extra, pretrain_parser)
        plan = build_plan(args, extra)
        if args.status:
            print(status_text(plan, states(plan)))
        elif args.table:
            path = os.path.join(plan.out, f"{args.name}.md")
            text = tables(plan, states(plan))
            atomic_write_text(path, text)
            print(text + f"\nwritten: {path}")
        elif args.dry_run:
            if not args.assume_tflops > 0:
                raise ConfigError(f"--assume-tflops: must be > 0, got {args.assume_tflops}")
            print(dry_run_text(plan, args.assume_tflops))
            submit(plan, args.retry_failed, args.resubmit, dry_run=True)
        else:
            with SubmitLock(plan.out):
                n = submit(plan, args.retry_failed, args.resubmit)
            print(f"{n} job(s) submitted; follow them with --status, gather the tables with --table")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["finish"] and len(sys.argv) == 3:
        sys.exit(finish(sys.argv[2]))
    sys.exit(main())
