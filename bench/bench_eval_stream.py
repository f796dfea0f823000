"""Per-evaluation peak memory and time of the streaming evaluation against the list-based one it
replaced, and of one model switched between eval_k values against one model per eval_k.

    .venv/bin/python bench/bench_eval_stream.py                         # 50M tokens, --eval-max-batches 20
    .venv/bin/python bench/bench_eval_stream.py --max-batches 0 --tokens 5000000    # full passes
    .venv/bin/python bench/bench_eval_stream.py --preset paper-small --d-model 512 --d-inner 1536 \
        --tokens 100000 --variants models-per-k one-model                        # a 108M-parameter model

The split is real text (tests/data/golden_corpus.txt, one token per byte) repeated to --tokens
tokens, written as a memory-mapped uint16 array to a temporary folder and deleted at the end. Each
measurement runs in a child process of its own, so that its peak is its own: the resident set's
high-water mark (VmHWM, reset through /proc/self/clear_refs just before) above the resident set
before the evaluation, memory-mapped pages read included; and the resident set at the end above
the same start. Variants:

- list: what evaluation did before: every batch of this rank's share built (the same batches), then
  the list cut to --max-batches, then the forwards;
- stream: evaluate_lm as it is now: each batch built when its forward asks for it, none past the limit.
- models-per-k: what launch/evaluate.py did before: the consolidated weights, and one model built
  from them per eval_k, all kept to the end; one-model: one model, its routers' eval_k switched in
  place, the weights dropped once it is built. The evaluation itself is left out (the same in both).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "data", "golden_corpus.txt")
MIB = 2 ** 20
VARIANTS = ("list", "stream", "models-per-k", "one-model")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""A fixed threshold: glibc otherwise raises it as large blocks are freed, and then keeps freed
weights in the process, where the resident set would hide what a variant frees or reuses."""


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """The resident set now, after resetting its high-water mark to it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _model(args, eval_k=None):
    from s2moe_ds.models import build_model
    from s2moe_ds.train import model_preset
    sizes = {k: v for k, v in (("d_model", args.d_model), ("d_inner", args.d_inner), ("n_layer", args.layers))
             if v is not None}
    moe = {} if eval_k is None else {"eval_k": eval_k}
    torch.manual_seed(0)
    return build_model(model_preset(args.preset, vocab_size=256, max_seq_len=args.seq_len, **sizes, moe=moe)).eval()


def _child_eval(args) -> str:
    from s2moe_ds.data import eval_batches
    from s2moe_ds.eval import evaluate_lm, evaluate_split
    tokens = np.load(args.tokens_file, mmap_mode="r")
    model = _model(args)
    limit = args.max_batches or None
    forward = (lambda x, y, m, state=None: model(x, y, m, state))
    with torch.no_grad():  # one-time costs (allocator pools, lazy set-up) out of the measurement
        x = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
        forward(x, x, torch.ones_like(x))
    before = _reset_peak()
    start = time.perf_counter()
    if args.child == "list":
        batches = list(eval_batches(tokens, args.seq_len, args.batch_size, 0, args.world_size))
        batches = batches if limit is None else batches[:limit]
        result = evaluate_split(lambda x, y, m: forward(x, y, m), batches, "cpu", len(tokens), len(tokens), "bpc")
        del batches  # the list-based evaluate_split dropped its list when it returned
    else:
        result = evaluate_lm(forward, model.cfg, tokens, args.seq_len, args.batch_size, 0, args.world_size, "cpu",
                             len(tokens), "bpc", limit)
    seconds = time.perf_counter() - start
    return f"{_status('VmHWM') - before} {_status('VmRSS') - before} {seconds} {result['bpc']!r}"


def _child_models(args) -> str:
    from s2moe_ds.moe import experts_per_token
    state = {k: v.clone() for k, v in _model(args).state_dict().items()}  # the consolidated weights
    before = _reset_peak()
    start = time.perf_counter()
    if args.child == "models-per-k":
        models = {}
        for k in (1, 2):
            models[k] = _model(args, eval_k=k)
            models[k].load_state_dict(state)
    else:
        model = _model(args)
        model.load_state_dict(state)
        del state
        for k in (1, 2):
            with experts_per_token(model, k):
                pass
    seconds = time.perf_counter() - start
    return f"{_status('VmHWM') - before} {_status('VmRSS') - before} {seconds} -"


def _run_child(args, mode: str, tokens_file: str):
    argv = [sys.executable, os.path.abspath(__file__), "--child", mode, "--tokens-file", tokens_file,
            *(a for a in sys.argv[1:])]
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         env={**os.environ, **CHILD_ENV}).stdout.strip().splitlines()[-1]
    peak, held, seconds, bpc = out.split()
    return int(peak), int(held), float(seconds), bpc


def _write_split(folder: str, n: int) -> str:
    text = np.frombuffer(open(CORPUS, "rb").read(), dtype=np.uint8)
    path = os.path.join(folder, "split.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n,))
    for start in range(0, n, len(text)):
        out[start:start + len(text)] = text[:n - start]
    out.flush()
    del out
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=50_000_000, help="tokens in the synthetic split")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--world-size", type=int, default=1, help="the evaluation is rank 0's share of this many ranks")
    p.add_argument("--max-batches", type=int, default=20, help="--eval-max-batches; 0: the full split")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--d-model", type=int)
    p.add_argument("--d-inner", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--reps", type=int, default=3, help="child processes per variant, interleaved")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to measure")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tokens-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("tokens", "seq_len", "batch_size", "world_size", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_batches < 0:
        p.error("--max-batches must be >= 0 (0: the full split)")
    torch.set_num_threads(1)
    if args.child:
        print(_child_eval(args) if args.child in ("list", "stream") else _child_models(args))
        return 0
    with tempfile.TemporaryDirectory() as folder:
        tokens_file = _write_split(folder, args.tokens)
        runs = {m: [] for m in args.variants}
        for _ in range(args.reps):
            for mode in runs:
                runs[mode].append(_run_child(args, mode, tokens_file))
    bpc = {runs[m][0][3] for m in ("list", "stream") if m in runs}
    print(f"{args.tokens:,} tokens, seq_len {args.seq_len}, batch {args.batch_size}, rank 0 of {args.world_size}, "
          f"max batches {args.max_batches or 'all'}, preset {args.preset}; {args.reps} child processes each; "
          f"the same bpc: {len(bpc) <= 1} ({', '.join(sorted(bpc))})")
    print("| variant | peak above the start (MiB) | held at the end (MiB) | seconds |\n|---|---|---|---|")
    for mode, rows in runs.items():
        peak, held, seconds = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"| {mode} | {peak / MIB:,.1f} | {held / MIB:,.1f} | {seconds:.3f} |")
    return 0 if len(bpc) <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
