"""Per-rank peak memory of a resume on the same layout against a resume on another layout (a
reshard, s2moe_ds/checkpoint/reshard.py), at two model sizes, in one run.

For each size it trains one step and saves it twice: on 2 ranks with ep_size 2 (checkpoint A) and
on 1 rank (checkpoint B), ZeRO 2, fp32. Then, each in fresh processes, one after the other:

    same layout   A on 2 ranks, ep 2        B on 1 rank
    reshard       B onto 2 ranks, ep 2      A onto 1 rank

A resume here is the trainer's whole setup (data, engine, checkpoint load), without a step; its
peak is the process's peak resident set (ru_maxrss, file pages a rank maps and touches included),
the largest over the ranks. Each reshard is compared with the same-layout resume of the layout it
lands on (its engine holds the same): the issue's target is at most 1.3x.

    python bench/bench_reshard.py                       # 108M and 317M (about 25 minutes on 2 cores)
    python bench/bench_reshard.py --sizes tiny          # seconds: a smoke run

Memory: the 317M rows need about 9 GiB at once (one rank training 317M); --sizes 108M alone stays
under 4 GiB.
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402

SIZES = {
    # name: (n_layer, d_model, d_inner, experts); GPT, 8 heads, 2 experts per token
    "tiny": (2, 32, 64, 4),
    "108M": (8, 512, 2048, 6),
    "317M": (8, 768, 3072, 8),
}
LIMIT = 1.3
"""The issue's bound: a reshard's per-rank peak at most this many times a same-layout resume's."""


# ----------------------------------------------------------------------------- one run's processes


def _experiment(size: str, ep: int, out_dir: str, text: str, cache: str):
    from s2moe_ds.data import DataConfig
    from s2moe_ds.parallel import ParallelConfig
    from s2moe_ds.train import ExperimentConfig, TrainConfig, model_preset
    n_layer, d_model, d_inner, experts = SIZES[size]
    model = model_preset("paper-small", n_layer=n_layer, d_model=d_model, d_inner=d_inner, max_seq_len=32,
                         dropout=0.0, moe=dict(num_experts=experts))
    train = TrainConfig(out_dir=out_dir, seq_len=32, max_steps=1, save_interval=1, eval_interval=0,
                        warmup_steps=1, log_interval=1, resume=True)
    return ExperimentConfig(model=model, parallel=ParallelConfig(ep_size=ep), train=train,
                            data=DataConfig(dataset="path", path=text, cache_dir=cache))


def _ds_config(gas: int):
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _train(rank, world, size, ep, out_dir, text, cache, gas):
    """One step, saved (checkpoint A or B)."""
    from s2moe_ds.train import Trainer
    torch.set_num_threads(1)
    return Trainer(_experiment(size, ep, out_dir, text, cache), _ds_config(gas)).run()["step"]


def _resume(rank, world, size, ep, out_dir, text, cache, gas):
    """The trainer's setup resuming out_dir's checkpoint; this process's peak and its time."""
    import deepspeed.comm as dist
    from s2moe_ds.train import Trainer
    torch.set_num_threads(1)
    trainer = Trainer(_experiment(size, ep, out_dir, text, cache), _ds_config(gas))
    start = time.perf_counter()
    trainer.setup()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = _rss_bytes()
    trainer.lock.release()
    dist.barrier()
    return {"peak": peak, "after": after, "seconds": seconds, "resharded": trainer.relayout, "step": trainer.step}


def _rank_main(rank, world, port, fn, args, results, log):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    with open(log, "a") as f:  # the trainer's own lines go to the log, the table to the terminal
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # noqa: BLE001 - reported by the parent with the rank
        results.put((rank, "error", traceback.format_exc()))


def spawn(fn, world: int, args, log: str, timeout: float = 3600.0):
    """fn(rank, world, *args) on `world` fresh processes (a gloo group each joins), their output
    appended to `log`; their results in rank order."""
    import torch.multiprocessing as mp
    from s2moe_ds.parallel import free_port
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, results, log)) for r in range(world)]
    for p in procs:
        p.start()
    got = {}
    try:
        while len(got) < world:
            rank, status, value = results.get(timeout=timeout)
            if status != "ok":
                raise SystemExit(f"error: rank {rank} of {fn.__name__}{args[:3]} failed (log: {log}):\n{value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(world)]


# ----------------------------------------------------------------------------- the benchmark


def _corpus(path: str) -> None:
    """200 kB of deterministic text (the data is not what is measured)."""
    import random
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(rng.randint(1, 9))) for _ in range(2000)]
    with open(path, "w") as f:
        f.write(" ".join(rng.choice(words) for _ in range(40000)) + "\n")


def _parameters(size: str) -> int:
    from s2moe_ds.models import build_model
    from s2moe_ds.train import model_preset
    n_layer, d_model, d_inner, experts = SIZES[size]
    cfg = model_preset("paper-small", n_layer=n_layer, d_model=d_model, d_inner=d_inner, max_seq_len=32,
                       moe=dict(num_experts=experts))
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def measure(size: str, work: str, text: str, cache: str):
    """The four resumes of one size: rows (dicts) for the table."""
    a, b = os.path.join(work, f"{size}-2ranks-ep2"), os.path.join(work, f"{size}-1rank")
    print(f"{size}: training one step on 2 ranks (ep 2) and on 1 rank, saving each", flush=True)
    log = os.path.join(work, f"{size}.log")
    spawn(_train, 2, (size, 2, a, text, cache, 1), log)
    spawn(_train, 1, (size, 1, b, text, cache, 2), log)
    runs = {}
    # Interleaved: baseline, then the reshard that lands on its layout.
    for key, world, ep, folder, gas in (("same 2", 2, 2, a, 1), ("reshard 1->2", 2, 2, b, 1),
                                        ("same 1", 1, 1, b, 2), ("reshard 2->1", 1, 1, a, 2)):
        print(f"{size}: resume {key}", flush=True)
        runs[key] = spawn(_resume, world, (size, ep, folder, text, cache, gas), log)
        assert all(r["resharded"] == key.startswith("reshard") and r["step"] == 1 for r in runs[key]), runs[key]
    rows = []
    for target_layout, same, reshard in (("2 ranks, ep 2", "same 2", "reshard 1->2"),
                                         ("1 rank", "same 1", "reshard 2->1")):
        base = max(r["peak"] for r in runs[same])
        peak = max(r["peak"] for r in runs[reshard])
        rows.append({"size": size, "parameters": _parameters(size), "onto": target_layout,
                     "from": "1 rank" if reshard.endswith("1->2") else "2 ranks, ep 2",
                     "same_layout_peak": base, "reshard_peak": peak, "ratio": peak / base,
                     "same_layout_s": max(r["seconds"] for r in runs[same]),
                     "reshard_s": max(r["seconds"] for r in runs[reshard]),
                     "same_layout_ranks": runs[same], "reshard_ranks": runs[reshard]})
    return rows


def table(rows) -> str:
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    return common.markdown_table(
        ["model", "resume onto", "reshard from", "same layout: peak GiB/rank", "reshard: peak GiB/rank", "ratio",
         "same layout s", "reshard s"],
        [[f"{r['size']} ({r['parameters']:,} parameters)", r["onto"], r["from"], gib(r["same_layout_peak"]),
          gib(r["reshard_peak"]), f"{r['ratio']:.2f}", f"{r['same_layout_s']:.1f}", f"{r['reshard_s']:.1f}"]
         for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="108M,317M",
                        help=f"comma-separated model sizes, of {', '.join(SIZES)} (default 108M,317M)")
    parser.add_argument("--work", default=None, help="folder for the corpus, checkpoints and the runs' logs "
                        "(default: a temporary one, removed at the end)")
    parser.add_argument("--json", default=os.path.join(common.ROOT, "runs", "bench", "bench_reshard.json"),
                        help="where to write the JSON record")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        parser.error(f"--sizes: {', '.join(unknown) or 'none given'}: choose among {', '.join(SIZES)}")
    if args.work is not None and os.path.exists(args.work) and os.listdir(args.work):
        parser.error(f"--work: {args.work} is not empty; name a new or empty folder")
    device = torch.device("cpu")
    info = common.machine(device)
    common.print_header("Resume on the same layout against a reshard: per-rank peak memory", info, device)
    work = args.work or tempfile.mkdtemp(prefix="bench_reshard_")
    os.makedirs(work, exist_ok=True)
    try:
        text, cache = os.path.join(work, "corpus.txt"), os.path.join(work, "cache")
        _corpus(text)
        rows = [row for size in sizes for row in measure(size, work, text, cache)]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    print()
    targets = [common.target(f"{r['size']} reshard onto {r['onto']} / same layout", r["ratio"], LIMIT,
                             basis="per-rank peak RSS (ru_maxrss), largest rank") for r in rows]
    return common.finish(args, "bench_reshard", device, info, rows, targets)


if __name__ == "__main__":
    sys.exit(main())
