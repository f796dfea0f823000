"""Real-text pretraining benchmark: tinyshakespeare through the deepspeed launcher, one run per router.

    .venv/bin/python bench/pretrain_real_text.py --data ../shared/data/tinyshakespeare.txt

Runs `launch/pretrain.py` on 2 CPU processes (ep_size 2, ZeRO-2) for each router in turn, with the
same seed, steps and batch, then prints a markdown table (validation BPC, median tokens/s, wall time)
and writes it as JSON. Numbers come from each run's own TensorBoard events.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("TINYSHAKESPEARE",
                                                         os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")))
    parser.add_argument("--routers", nargs="+", default=["s2moe", "smoe", "dense"])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_real_text"))
    parser.add_argument("--nproc", type=int, default=2)
    args, extra = parser.parse_known_args()
    if not os.path.isfile(args.data):
        print(f"error: --data: {args.data} not found (tinyshakespeare.txt lives in ../shared/data/)", file=sys.stderr)
        return 2
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    rows = []
    for router in args.routers:
        out_dir = os.path.join(args.out, router)
        cmd = [deepspeed, "--num_gpus", str(args.nproc), os.path.join(ROOT, "launch", "pretrain.py"),
               "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero2.json"), "--preset", args.preset,
               "--router", router, "--ep-size", str(args.nproc), "--dataset", "path", "--path", args.data,
               "--out-dir", out_dir, "--max-steps", str(args.max_steps), "--eval-interval", str(args.max_steps // 4),
               "--save-interval", str(args.max_steps), *extra]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        wall = time.perf_counter() - start
        tb = os.path.join(out_dir, "tensorboard")
        bpc = _scalars(tb, "valid/bpc")
        speed = [v for _, v in _scalars(tb, "train/tokens_per_s")]
        rows.append({"router": router, "steps": args.max_steps, "valid_bpc": bpc[-1][1], "bpc_curve": bpc,
                     "tokens_per_s_median": statistics.median(speed), "wall_s": wall, "command": " ".join(cmd)})
    print("\n| router | steps | valid BPC | tokens/s (median) | wall time (s) |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['router']} | {r['steps']} | {r['valid_bpc']:.4f} | {r['tokens_per_s_median']:,.0f} | {r['wall_s']:.0f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
