"""Train and evaluate SMoE and S2MoE side by side: same budget, several seeds, one table.

    python launch/compare.py --path ../shared/data/tinyshakespeare.txt --seeds 1 2 3 \
        --max-steps 2000 --out runs/compare
    python launch/compare.py --path ... --variants s2moe --ablate uncertainty_coef=0,0.5,1.0

Default variants: smoe (DeepSpeed's MoE, top-2), s2moe (top-2 per path) and s2moe-top1 (top-1 per
path: SMoE top-2's expert compute). Each (variant, seed) trains with launch/pretrain.py under the
deepspeed launcher, then is evaluated on valid and test with 1 and with 2 experts per token (full
passes). Writes OUT/results.md (mean ± std over seeds), results.json and results_curves.png. A run
whose result.json records the same command is reused, so an interrupted comparison continues.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from s2moe_ds.config import ConfigError, model_preset  # noqa: E402
from s2moe_ds.eval.compare import BUILTIN_VARIANTS, per_seed_table, plan_variants, summary_table  # noqa: E402
from s2moe_ds.fileio import atomic_write_text  # noqa: E402
from s2moe_ds.train import free_port  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--path", help="a text file (split 90/5/5) or a folder saved with datasets")
    data.add_argument("--dataset", help="embedded | enwik8 | text8 | wikitext-103")
    p.add_argument("--variants", nargs="*", default=["smoe", "s2moe", "s2moe-top1"],
                   help=f"built-in variants: {', '.join(BUILTIN_VARIANTS)}")
    p.add_argument("--ablate", action="append", default=[], metavar="FIELD=V1,V2",
                   help="one extra variant of --ablate-base per value (repeatable)")
    p.add_argument("--ablate-base", default="s2moe")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a MoE/S2MoE field for every variant (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--evals", type=int, default=10, help="validation points along training (the curves)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (ep_size = nproc)")
    p.add_argument("--deepspeed-config", default=os.path.join(ROOT, "ds_configs", "zero2.json"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "compare"))
    p.add_argument("--reference", default="smoe", help="variant whose 2-expert score the table compares with")
    p.add_argument("--name", default="results", help="report files: OUT/NAME.md, NAME.json, NAME_curves.png "
                   "(runs are shared by every report in OUT)")
    return p.parse_known_args(argv)


def _code_version() -> str:
    """The commit the runs' code came from, marked when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}{' with uncommitted changes' if dirty else ''}" if head else "unknown (not a git checkout)"


def train_and_evaluate(cmd, run_dir, log):
    """Train with `cmd` into run_dir (unless a finished run with the same command is there)."""
    from s2moe_ds.eval.evaluate import EvalConfig, evaluate_checkpoint
    from s2moe_ds.train.metrics import read_scalars
    record_path = os.path.join(run_dir, "result.json")
    key = cmd[1:]  # everything but the launcher's own path
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("command") == key:
            log(f"reusing {run_dir}")
            return record
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    log("$ " + " ".join(cmd))
    # A free rendezvous port per run, so that two comparisons (or tests) on one machine never meet.
    launch = [*cmd[:3], "--master_port", str(free_port()), *cmd[3:]]
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as out:
        rc = subprocess.run(launch, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode
    wall = time.perf_counter() - start
    if rc != 0:
        with open(os.path.join(run_dir, "train.log")) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"training failed with status {rc}; log {run_dir}/train.log ends:\n{tail}")
    report = evaluate_checkpoint(EvalConfig(checkpoint=run_dir, eval_k=(1, 2), splits=("valid", "test")), log=log)
    tb = os.path.join(run_dir, "tensorboard")
    metric = report["metric"]
    speed = [v for _, v in read_scalars(tb, "train/tokens_per_s")]
    record = {"command": key, "train_wall_s": wall, "train_tokens_per_s_median": statistics.median(speed) if speed else None,
              "valid_curve": read_scalars(tb, f"valid/{metric}"), "eval": report}
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


def main(argv=None) -> int:
    args, extra = parse(argv)
    try:
        variants = plan_variants(args.variants, args.ablate, args.ablate_base, args.set, args.preset)
        if not variants:
            raise ConfigError("--variants: nothing to run; name at least one variant or --ablate")
        if args.max_steps < 1 or args.evals < 1 or args.nproc < 1:
            raise ConfigError("--max-steps, --evals and --nproc: must be >= 1")
        model_preset(args.preset)
        data = ["--dataset", "path", "--path", os.path.abspath(args.path)] if args.path else ["--dataset", args.dataset]
        if args.path and not os.path.exists(args.path):
            raise ConfigError(f"--path: {args.path} does not exist")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    results, curves = {}, {}
    for v in variants:
        for seed in args.seeds:
            ep = ["--ep-size", str(args.nproc)] if v.router != "dense" else []
            cmd = [launcher, "--num_gpus", str(args.nproc), os.path.join(ROOT, "launch", "pretrain.py"),
                   "--deepspeed_config", os.path.abspath(args.deepspeed_config), "--preset", args.preset, *ep, *data,
                   "--seed", str(seed), "--max-steps", str(args.max_steps),
                   "--eval-interval", str(max(args.max_steps // args.evals, 1)), "--save-interval", str(args.max_steps),
                   "--out-dir", os.path.abspath(os.path.join(args.out, "runs", v.slug, f"seed{seed}")), *v.flags(), *extra]
            record = train_and_evaluate(cmd, os.path.join(args.out, "runs", v.slug, f"seed{seed}"), print)
            results.setdefault(v.name, []).append({**record, "seed": seed})
            curves.setdefault(v.name, []).append([tuple(p) for p in record["valid_curve"]])
    metric = next(iter(results.values()))[0]["eval"]["metric"]
    reference = args.reference if args.reference in results else None
    table = summary_table(variants, results, metric, reference)
    seeds_table = per_seed_table(variants, results, metric)
    command = " ".join(["python", "launch/compare.py", *(argv if argv is not None else sys.argv[1:])])
    code = _code_version()
    from s2moe_ds.eval import plots
    plots.save_figure(plots.curves_figure(curves, f"valid {metric} (eval_k = training k)",
                                          f"validation during training, {args.preset}, {args.max_steps} steps"),
                      os.path.join(args.out, f"{args.name}_curves.png"))
    md = (f"# Comparison\n\nCommand: `{command}`\n\nCode: {code}\n\n{table}\n\nPer seed:\n\n{seeds_table}\n\n"
          f"Curves: {args.name}_curves.png (mean over seeds, band = min..max).\n")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, f"{args.name}.md"), md)
    atomic_write_text(os.path.join(args.out, f"{args.name}.json"), json.dumps(
        {"command": command, "code": code, "variants": [{"name": v.name, "overrides": dict(v.overrides)} for v in variants],
         "runs": results}, indent=2) + "\n")
    print("\n" + table + f"\n\nwritten: {os.path.join(args.out, args.name)}.md, .json, _curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
