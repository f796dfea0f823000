"""Data preparation at corpus sizes users train on: peak memory and time of the process that fills
the token cache (rank 0's work), character-level and subword, side by side in one run.

    .venv/bin/python bench/bench_data.py                              # 10 MB, 100 MB, 1 GB
    .venv/bin/python bench/bench_data.py --sizes-mb 10 100 --subword-max-mb 100 --baseline f0fadcd

Inputs: real text, ../shared/data/tinyshakespeare.txt (1.1 MB) repeated to each size, and a
variant with a line of characters beyond U+FFFF (emoji) every 50 lines, where a Python string of
the whole text would take 4 bytes per character. They are written under --work (default
/tmp/s2moe_bench_data, never the repository) and removed at the end unless --keep.

Each case runs prepare_corpus in a fresh child process on a fresh cache folder: the peak is that
process's own ru_maxrss (rank 0's; "after import" is its peak once s2moe_ds and torch are
imported, before any data is read), the time is prepare_corpus's alone; the worker processes
that apply a subword tokenizer are reported apart (their largest peak each; they run at the same
time as rank 0). --baseline COMMIT
also runs that commit's s2moe_ds (git archive into --work) on the sizes up to --baseline-max-mb.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from s2moe_ds.tables import markdown_table  # noqa: E402

SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")
EMOJI_LINE = "\U0001F600 \U0001F680 \U0001F4DA the players \U0001F3AD enter \U0001F451\n"

CHILD = r"""
import json, os, resource, sys, time
cfg_kw = json.loads(sys.argv[1])
from s2moe_ds.data import DataConfig, prepare_corpus
imported_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
corpus = prepare_corpus(DataConfig(**cfg_kw))
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({
    "seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "imported_kib": imported_kib,
    "workers_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    "tokens": int(sum(len(s) for s in corpus.splits.values())), "vocab": corpus.tokenizer.vocab_size,
    "dtype": str(corpus.splits["train"].dtype)}))
"""


def make_input(work: str, size_mb: int, emoji: bool) -> str:
    """tinyshakespeare repeated to `size_mb` MB (10^6 bytes), cut at a line end; with `emoji`, a
    line of characters beyond U+FFFF after every 50 lines."""
    path = os.path.join(work, f"shakespeare_{size_mb}mb{'_emoji' if emoji else ''}.txt")
    if os.path.exists(path):
        return path
    with open(SHAKESPEARE, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if emoji:
        lines = [x for i, line in enumerate(lines) for x in ((line, EMOJI_LINE) if i % 50 == 49 else (line,))]
    block = "".join(lines).encode("utf-8")
    target = size_mb * 1_000_000
    with open(path + ".part", "wb") as out:
        written = 0
        while written + len(block) <= target:
            out.write(block)
            written += len(block)
        rest = block[:target - written]
        out.write(rest[:rest.rfind(b"\n") + 1])
    os.replace(path + ".part", path)
    return path


def run_case(path: str, tokenizer: str, work: str, pythonpath: str, timeout: float) -> dict:
    cache = os.path.join(work, "cache")
    shutil.rmtree(cache, ignore_errors=True)  # ours: created below, by the child
    cfg = {"dataset": "path", "path": path, "tokenizer": tokenizer, "cache_dir": cache}
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=work)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished in {timeout:.0f} s"}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.perf_counter() - start
    return out


def baseline_tree(work: str, commit: str) -> str:
    folder = os.path.join(work, f"baseline-{commit}")
    if not os.path.isdir(folder):
        os.makedirs(folder)
        archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "s2moe_ds"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--tokenizers", nargs="+", default=["char", "subword"], choices=["char", "subword", "word", "byte"])
    p.add_argument("--subword-max-mb", type=int, default=1000, help="skip subword above this size (2 cores: slow)")
    p.add_argument("--no-emoji", action="store_true", help="only the plain text, not the non-BMP variant")
    p.add_argument("--baseline", default=None, help="also run this commit's s2moe_ds (e.g. f0fadcd)")
    p.add_argument("--baseline-max-mb", type=int, default=100)
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per case")
    p.add_argument("--work", default="/tmp/s2moe_bench_data")
    p.add_argument("--keep", action="store_true", help="keep the generated inputs")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not os.path.isfile(SHAKESPEARE):
        print(f"error: {SHAKESPEARE} not found; the benchmark repeats it to build its inputs", file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)
    codes = [("streamed", ROOT)]
    if args.baseline:
        codes.append((f"before ({args.baseline})", baseline_tree(args.work, args.baseline)))
    rows, records = [], []
    for size in args.sizes_mb:
        for emoji in ([False] if args.no_emoji else [False, True]):
            path = make_input(args.work, size, emoji)
            for tokenizer in args.tokenizers:
                if tokenizer == "subword" and size > args.subword_max_mb:
                    continue
                for code, tree in codes:
                    if code != "streamed" and size > args.baseline_max_mb:
                        continue
                    r = run_case(path, tokenizer, args.work, tree, args.timeout_s)
                    text = "with emoji" if emoji else "plain"
                    record = {"size_mb": size, "text": text, "tokenizer": tokenizer, "code": code, **r}
                    records.append(record)
                    if "error" in r:
                        rows.append([f"{size} MB", text, tokenizer, code, "-", "-", "-", "-", "-", r["error"]])
                    else:
                        rows.append([f"{size} MB", text, tokenizer, code, f"{r['peak_kib'] / 1024:,.0f}",
                                     f"{r['imported_kib'] / 1024:,.0f}",
                                     f"{r['workers_peak_kib'] / 1024:,.0f}", f"{r['seconds']:,.1f}",
                                     f"{r['tokens']:,}", r["dtype"]])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(markdown_table(["corpus", "text", "tokenizer", "code", "rank 0 peak MiB", "after import MiB",
                          "workers' peak MiB",
                          "prepare s", "tokens", "ids"], rows))
    print(f"\nload average at the end: {os.getloadavg()}, cpus: {os.cpu_count()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "bench_data", "command": " ".join(sys.argv), "rows": records}, f, indent=1)
    if not args.keep:
        for name in os.listdir(args.work):
            if name.startswith("shakespeare_"):
                os.unlink(os.path.join(args.work, name))  # ours: make_input wrote them
    return 0


if __name__ == "__main__":
    sys.exit(main())
