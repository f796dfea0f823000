"""The GPU suite: one run on a GPU machine installs what it lacks, runs the CUDA tests and the
benchmarks, and writes one report (docs/performance.md keeps its latest figures).

    python3 bench/gpu_suite.py --wheels .whl --out $OUT          # a GPU machine, at most 8 minutes
    python3 bench/gpu_suite.py --dry-run --out runs/gpu_suite     # anywhere: the same steps, tiny, on the CPU

Steps, each a subprocess with its own time limit, so that one that breaks or hangs still leaves
the others' results:
  wheels     pip install --no-index --no-deps --target <out>/site <wheels>/*.whl: DeepSpeed and the
             pure-Python packages such a machine lacks (docs/performance.md says which), then
             PYTHONPATH for every later step
  tests      pytest -m cuda tests/system/test_cuda.py with DS_ACCELERATOR=cuda: bf16 training through the
             deepspeed launcher and NCCL on one GPU, the fused S2MoE paths and the batched experts
             against their references
  experts    bench_experts.py, bf16: DeepSpeed's loop against batched experts, at paper-small
             shapes and with small experts (d_model 64, 16 experts)
  layer      bench_layer.py, bf16: S2MoE against DeepSpeed's MoE at the layer
  step       bench_step.py, bf16: paper-small and a GPU-sized model (d_model 1024, 8 layers, 16
             experts), with batched experts: tokens/s, TFLOP/s, MFU
  inference  bench_inference.py, bf16: one against two experts per token
The report: <out>/gpu_suite.json (each step's status, time and record) and <out>/gpu_suite.md
(a summary table, then each benchmark's own tables). MFU is against the GPU's dense peak for the
dtype (bench/common.py PEAK_TFLOPS).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 480

# name -> (seconds allowed, command after the interpreter, {flag: value} for a dry run)
GPU_SIZED = '{"d_model": 1024, "n_head": 16, "d_inner": 4096, "n_layer": 8, "max_seq_len": 1024, ' \
            '"moe": {"num_experts": 16}}'
TINY_LAYER = ["--d-model", "16", "--d-inner", "32", "--experts", "4", "--tokens", "64"]


def steps(dry_run: bool) -> List[dict]:
    """The suite's steps: name, time limit, argv, extra environment."""
    dev = ["--device", "cpu", "--dtype", "fp32", "--reps", "2", "--warmup", "1"] if dry_run else \
          ["--device", "cuda", "--dtype", "bf16", "--threads", "0"]
    bench = lambda script: [os.path.join(ROOT, "bench", script)]  # noqa: E731
    tests = {"DS_ACCELERATOR": "cpu" if dry_run else "cuda"}
    return [
        dict(name="tests", limit=200, env=tests,
             argv=["-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                   os.path.join(ROOT, "tests", "system", "test_cuda.py")]),
        dict(name="experts-paper-small", limit=50, json=True,
             argv=bench("bench_experts.py") + dev + (TINY_LAYER if dry_run else ["--reps", "20"])),
        dict(name="experts-small", limit=40, json=True,
             argv=bench("bench_experts.py") + dev + (TINY_LAYER if dry_run else
                                                      ["--d-model", "64", "--d-inner", "128", "--experts", "16",
                                                       "--reps", "20"])),
        dict(name="layer", limit=50, json=True,
             argv=bench("bench_layer.py") + dev + (TINY_LAYER if dry_run else
                                                    ["--d-model", "256", "--d-inner", "512", "--reps", "20"])),
        dict(name="step-paper-small", limit=60, json=True,
             argv=bench("bench_step.py") + dev + ["--presets", "tiny" if dry_run else "paper-small",
                                                   "--expert-impl", "batched"]
             + (["--tokens", "128"] if dry_run else ["--tokens", "16384", "--reps", "10"])),
        dict(name="step-gpu-sized", limit=80, json=True,
             argv=bench("bench_step.py") + dev + ["--presets", "tiny" if dry_run else "paper-small",
                                                   "--expert-impl", "batched", "--variants", "smoe-k2", "s2moe-k1",
                                                   "s2moe-k2"]
             + (["--tokens", "128"] if dry_run else ["--model-overrides", GPU_SIZED, "--tokens", "32768",
                                                     "--seq-len", "1024", "--no-memory"])),
        dict(name="inference", limit=60, json=True,
             argv=bench("bench_inference.py") + dev + (["--preset", "tiny", "--balance-steps", "0"] if dry_run else [])),
    ]


def install_wheels(wheels: str, site: str) -> Dict[str, object]:
    """Install every wheel in `wheels` into `site` (no index, no dependency resolution: the folder
    holds exactly what is missing)."""
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not found:
        return {"status": "failed", "message": f"--wheels: no .whl files in {wheels}"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--no-cache-dir", "--upgrade", "--target", site, *found], capture_output=True, text=True,
                          timeout=120)
    return {"status": "ok" if proc.returncode == 0 else "failed", "wheels": [os.path.basename(w) for w in found],
            "output": (proc.stdout + proc.stderr)[-2000:]}


def run_step(step: dict, env: Dict[str, str], out: str, deadline: float) -> dict:
    limit = min(step["limit"], max(1.0, deadline - time.monotonic()))
    argv = [sys.executable, *step["argv"]]
    record_path = os.path.join(out, f"{step['name']}.json")
    if step.get("json"):
        argv += ["--json", record_path]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                              env={**env, **step.get("env", {})})
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit:.0f} s"
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    result = {"name": step["name"], "status": status, "seconds": time.monotonic() - start,
              "command": " ".join(argv), "stdout": stdout[-20000:], "stderr": stderr[-4000:]}
    if step.get("json") and os.path.isfile(record_path):
        with open(record_path) as f:
            result["record"] = json.load(f)
    return result


def _tables(stdout: str) -> str:
    """The markdown tables and their caption lines of a benchmark's output."""
    keep = [line for line in stdout.splitlines()
            if line.startswith("|") or (line and line[0].isdigit() and "tokens" in line)]
    return "\n".join(keep)


def summary_rows(results: List[dict]) -> List[List[str]]:
    """One row per benchmark variant that reports throughput."""
    rows = []
    for r in results:
        for row in (r.get("record") or {}).get("rows", []):
            tflops = row.get("tflops", row.get("achieved_gflops", 0) / 1e3 if "achieved_gflops" in row else None)
            if tflops is None:
                continue
            mfu = row.get("mfu")
            rows.append([r["name"], f"{row.get('preset', '')} {row['variant']}".strip(), f"{row['tokens_per_s']:,.0f}",
                         f"{tflops:.2f}", "-" if mfu is None else f"{mfu:.1%}"])
    return rows


def report(results: List[dict], info: dict) -> str:
    lines = [f"# GPU suite ({'DRY RUN on the CPU at tiny sizes: these are not figures' if info['dry_run'] else 'GPU run'})",
             "", f"- date: {info['date']}", f"- command: `{info['command']}`", f"- device: {info['device']}",
             f"- torch {info['torch']}, deepspeed {info.get('deepspeed')}, Python {info['python']}", "",
             "| step | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} |" for r in results]
    rows = summary_rows(results)
    if rows:
        lines += ["", "| step | variant | tokens/s | TFLOP/s | MFU |", "| --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    for r in results:
        body = _tables(r["stdout"]) if r["name"] != "tests" else r["stdout"].strip().splitlines()[-1:]
        body = body if isinstance(body, str) else "\n".join(body)
        lines += ["", f"## {r['name']}", "", f"`{r['command'].replace(ROOT + '/', '')}`", "", body or "(no output)"]
        if r["status"] != "ok":
            lines += ["", "```", r["stderr"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md and each step's record")
    parser.add_argument("--wheels", default=None, help="folder of .whl files to install first (a machine without internet)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the suite, measures nothing")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"whole-suite time limit (default {BUDGET_S})")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps (names as in the report)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.path.join(os.path.abspath(args.out), "torch_extensions")}
    results = []
    if args.wheels:
        site = os.path.join(os.path.abspath(args.out), "site")
        start = time.monotonic()
        installed = install_wheels(args.wheels, site)
        results.append({"name": "wheels", "status": installed["status"], "seconds": time.monotonic() - start,
                        "command": f"pip install --target {site} {args.wheels}/*.whl",
                        "stdout": installed.get("output", ""), "stderr": installed.get("message", "")})
        env["PYTHONPATH"] = os.pathsep.join([site, ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    chosen = steps(args.dry_run)
    if args.only:
        unknown = set(args.only) - {s["name"] for s in chosen}
        if unknown:
            parser.error(f"--only: unknown steps {sorted(unknown)}; choose from {[s['name'] for s in chosen]}")
        chosen = [s for s in chosen if s["name"] in args.only]
    probe = subprocess.run([sys.executable, "-c", "import json, platform, torch; import deepspeed; print(json.dumps("
                            "{'torch': torch.__version__, 'deepspeed': deepspeed.__version__, 'python': "
                            "platform.python_version(), 'device': torch.cuda.get_device_name(0) if "
                            "torch.cuda.is_available() else 'cpu'}))"],
                           capture_output=True, text=True, env=env, timeout=120)
    try:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(f"error: cannot import torch and deepspeed here (pass --wheels?):\n{probe.stderr[-2000:]}", file=sys.stderr)
        return 2
    if not args.dry_run and info["device"] == "cpu":
        print("error: no CUDA device; run with --dry-run to check the suite on a CPU", file=sys.stderr)
        return 2
    info.update(dry_run=args.dry_run, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                command="python3 bench/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    for step in chosen:
        if time.monotonic() >= deadline:
            results.append({"name": step["name"], "status": "skipped (suite budget spent)", "seconds": 0.0,
                            "command": "", "stdout": "", "stderr": ""})
            continue
        result = run_step(step, env, args.out, deadline)
        print(f"{result['name']}: {result['status']} ({result['seconds']:.1f} s)", flush=True)
        results.append(result)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump({"info": info, "steps": results}, f, indent=2, default=str)
    text = report(results, info)
    with open(os.path.join(args.out, "gpu_suite.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
