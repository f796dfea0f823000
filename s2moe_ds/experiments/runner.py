"""Runs a comparison: every (variant, seed) trained by launch/pretrain.py under the deepspeed
launcher, evaluated with 1 and 2 experts per token, reported as tables, JSON and curves.

A run whose result.json records the same command is reused, so an interrupted comparison continues.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from ..config import ConfigError
from ..eval.evaluate import EvalConfig, evaluate_checkpoint
from ..fileio import atomic_write_text
from ..parallel import free_port
from ..train.monitor import read_all_scalars
from ..train.presets import model_preset
from .compare import Variant, cost_table, per_seed_table, plan_variants, summary_table
from .runfolders import check_run_folder, write_record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""The repository the package runs from (launch/pretrain.py is started from it)."""


def code_version() -> str:
    """The commit the runs' code came from, marked when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}{' with uncommitted changes' if dirty else ''}" if head else "unknown (not a git checkout)"


def train_and_evaluate(cmd: List[str], run_dir: str, log: Callable[[str], None],
                       data: Optional[Dict[str, str]] = None) -> Dict:
    """Train with `cmd` into run_dir (unless a finished run with the same command is there), then
    evaluate it on valid and test with 1 and 2 experts per token, on `data` (DataConfig fields: the
    evaluation opens no path the checkpoint records outside its run folder).

    A folder that holds another command's run, or one whose lock a training run holds, is refused
    (runfolders.check_run_folder): never removed. An unfinished run of this same command (the
    comparison was stopped) is started again from scratch."""
    record_path = os.path.join(run_dir, "result.json")
    key = cmd[1:]  # everything but the launcher's own path
    if check_run_folder(run_dir, key):
        if os.path.isfile(record_path):
            log(f"reusing {run_dir}")
            with open(record_path) as f:
                return json.load(f)
        shutil.rmtree(run_dir)  # this command's own interrupted run, unlocked: checked just above
    write_record(run_dir, {"command": key})
    log("$ " + " ".join(cmd))
    # A free rendezvous port per run, so that two comparisons (or tests) on one machine never meet.
    launch = [*cmd[:3], "--master_port", str(free_port()), *cmd[3:]]
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as out:
        rc = subprocess.run(launch, stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        with open(os.path.join(run_dir, "train.log")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"training failed with status {rc}; log {run_dir}/train.log ends:\n{tail}")
    return evaluate_and_record(run_dir, key, wall, log, data)


def evaluate_and_record(run_dir: str, key: List[str], wall: Optional[float], log: Callable[[str], None],
                        data: Optional[Dict[str, str]] = None) -> Dict:
    """Evaluate a finished run (valid and test, 1 and 2 experts per token), read its training
    scalars, and write result.json: what the comparison tables are made of. The sequential
    harness and the study's SLURM jobs both end here, so their tables agree."""
    report = evaluate_checkpoint(EvalConfig(checkpoint=run_dir, eval_k=(1, 2), splits=("valid", "test"),
                                            data_overrides=dict(data or {})), log=log)
    scalars = read_all_scalars(os.path.join(run_dir, "tensorboard"))
    metric = report["metric"]
    speed = [v for _, v in scalars.get("train/tokens_per_s", [])]
    step_ms = [v for _, v in scalars.get("train/step_ms", [])]
    # S2MoE's mixing gate at the end of training, averaged over the layers: a gate near 1 means
    # the noisy path no longer contributes.
    gates = [values[-1][1] for tag, values in scalars.items() if tag.endswith("/mix_gate_mean") and values]
    record = {"command": key, "train_wall_s": wall,
              "train_tokens_per_s_median": statistics.median(speed) if speed else None,
              "train_step_ms_median": statistics.median(step_ms) if step_ms else None,
              "final_mix_gate_mean": statistics.fmean(gates) if gates else None,
              "valid_curve": scalars.get(f"valid/{metric}", []), "eval": report}
    atomic_write_text(os.path.join(run_dir, "result.json"), json.dumps(record, indent=2) + "\n")
    return record


def pretrain_flags(variant: Variant, seed: int, preset: str, data: Sequence[str], max_steps: int, evals: int,
                   extra: Sequence[str] = (), ep: Sequence[str] = (), out_dir: Optional[str] = None) -> List[str]:
    """launch/pretrain.py's flags for one (variant, seed) of a comparison: the same budget, the
    same evaluation points and one final checkpoint for every variant. The launcher's own flags and
    the DeepSpeed config are the caller's; `ep` and `out_dir` are left out when the launcher (as
    slurm/pretrain.sh does) adds its own."""
    return ["--preset", preset, *ep, *data, "--seed", str(seed), "--max-steps", str(max_steps),
            "--eval-interval", str(max(max_steps // evals, 1)), "--save-interval", str(max_steps),
            *(["--out-dir", out_dir] if out_dir else []), *variant.flags(), *extra]


def run_comparison(args, extra: Sequence[str], argv: Sequence[str]) -> int:
    """launch/compare.py's work, from its parsed flags (s2moe_ds.cli.compare_parser); `extra`
    flags pass through to launch/pretrain.py."""
    args.deepspeed_config = args.deepspeed_config or os.path.join(ROOT, "ds_configs", "zero2.json")
    args.out = args.out or os.path.join(ROOT, "runs", "compare")
    try:
        variants = plan_variants(args.variants, args.ablate, args.ablate_base, args.set, args.preset)
        if not variants:
            raise ConfigError("--variants: nothing to run; name at least one variant or --ablate")
        if args.max_steps < 1 or args.evals < 1 or args.nproc < 1:
            raise ConfigError("--max-steps, --evals and --nproc: must be >= 1")
        model_preset(args.preset)
        if args.path and not os.path.exists(args.path):
            raise ConfigError(f"--path: {args.path} does not exist")
        if not os.path.isfile(args.deepspeed_config):
            raise ConfigError(f"--deepspeed-config: file not found: {args.deepspeed_config}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = ["--dataset", "path", "--path", os.path.abspath(args.path)] if args.path else ["--dataset", args.dataset]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    results, curves = {}, {}
    for v in variants:
        for seed in args.seeds:
            run_dir = os.path.abspath(os.path.join(args.out, "runs", v.slug, f"seed{seed}"))
            ep = ["--ep-size", str(args.nproc)] if v.routed else []
            cmd = [launcher, "--num_gpus", str(args.nproc), os.path.join(ROOT, "launch", "pretrain.py"),
                   "--deepspeed_config", os.path.abspath(args.deepspeed_config),
                   *pretrain_flags(v, seed, args.preset, data, args.max_steps, args.evals, extra, ep, run_dir)]
            corpus = {"path": os.path.abspath(args.path)} if args.path else None
            try:
                record = train_and_evaluate(cmd, run_dir, print, corpus)
            except ConfigError as e:  # a run folder that is another command's or in use: refused, kept
                print(f"error: {e}", file=sys.stderr)
                return 2
            results.setdefault(v.name, []).append({**record, "seed": seed})
            curves.setdefault(v.name, []).append([tuple(p) for p in record["valid_curve"]])
    metric = next(iter(results.values()))[0]["eval"]["metric"]
    reference = args.reference if args.reference in results else None
    table = summary_table(variants, results, metric, reference)
    seeds_table = per_seed_table(variants, results, metric)
    costs = cost_table(variants, results)
    command = " ".join(["python", "launch/compare.py", *argv])
    code = code_version()
    from ..eval import plots
    plots.save_figure(plots.curves_figure(curves, f"valid {metric} (eval_k = training k)",
                                          f"validation during training, {args.preset}, {args.max_steps} steps"),
                      os.path.join(args.out, f"{args.name}_curves.png"))
    md = (f"# Comparison\n\nCommand: `{command}`\n\nCode: {code}\n\n{table}\n\nPer seed:\n\n{seeds_table}\n\n"
          f"Training cost (measured on this machine):\n\n{costs}\n\n"
          f"Curves: {args.name}_curves.png (mean over seeds, band = min..max).\n")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, f"{args.name}.md"), md)
    atomic_write_text(os.path.join(args.out, f"{args.name}.json"), json.dumps(
        {"command": command, "code": code, "variants": [{"name": v.name, "overrides": dict(v.overrides)}
                                                        for v in variants], "runs": results}, indent=2) + "\n")
    print("\n" + table + "\n\n" + costs + f"\n\nwritten: {os.path.join(args.out, args.name)}.md, .json, _curves.png")
    return 0
