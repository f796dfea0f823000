"""Collectives per training step of one MoE layer on 2 gloo processes, expert-parallel size 2.

    .venv/bin/python bench/bench_comm.py
    .venv/bin/python bench/bench_comm.py --tokens 1024 --dtype bf16

For S2MoE and DeepSpeed's MoE at k = 1 and 2 (training mode, forward + backward with an input
that requires grad, as inside a model), counts the calls of deepspeed.comm.all_to_all_single and
deepspeed.comm.all_reduce (both wrapped on every rank) and the bytes of their input buffers, per
rank. 'off-rank' is the part of an all-to-all buffer that leaves the rank: (ep - 1) / ep of it.
S2MoE routes its clean and noisy copies in one dispatch, so its buffers are those of a
DeepSpeed MoE layer with twice the tokens; S2MoE top-1 moves what DeepSpeed top-2 moves.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402

WORLD = 2


class CollectiveCounter:
    """Wraps deepspeed.comm's all_to_all_single and all_reduce, which DeepSpeed's MoE (and the
    project's gate) call through the module attribute at call time."""

    NAMES = ("all_to_all_single", "all_reduce")

    def __init__(self) -> None:
        import deepspeed.comm as dist
        self.dist = dist
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        self.reset()

    def reset(self) -> None:
        self.calls = {name: 0 for name in self.NAMES}
        self.bytes = {name: 0 for name in self.NAMES}

    def snapshot(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes)}

    def __enter__(self):
        def wrap(name, original):
            def counted(*args, **kwargs):
                # all_to_all_single(output, input, ...): the input is what this rank sends.
                buf = args[1] if name == "all_to_all_single" else args[0]
                self.calls[name] += 1
                self.bytes[name] += buf.numel() * buf.element_size()
                return original(*args, **kwargs)
            return counted

        for name, original in self.originals.items():
            setattr(self.dist, name, wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(self.dist, name, original)


def _worker(rank: int, world_size: int, opts: dict) -> dict:
    torch.set_num_threads(1)  # two ranks share the cores
    from bench.bench_layer import build_layer, fwd_bwd, make_inputs
    dtype = common.DTYPES[opts["dtype"]]
    out = {}
    with CollectiveCounter() as counter:
        for k in opts["k"]:
            for kind in ("s2moe", "dsmoe"):
                torch.manual_seed(opts["seed"])
                layer = build_layer(kind, k, opts["d_model"], opts["d_inner"], opts["experts"],
                                    ep_size=world_size).to(dtype).train()
                layer.set_deepspeed_parallelism()
                x_TD, grad_TD = make_inputs(opts["tokens"], opts["d_model"], "cpu", dtype, opts["seed"] + rank)
                call = fwd_bwd(layer, x_TD, grad_TD)
                call()  # warm-up: groups and lazy state settle
                counter.reset()
                layer.zero_grad(set_to_none=True)
                x_TD.grad = None
                y_TD, l_aux, _ = layer(x_TD)
                fwd = counter.snapshot()
                counter.reset()
                if l_aux.requires_grad:
                    torch.autograd.backward([y_TD, l_aux], [grad_TD, torch.tensor(0.01, dtype=l_aux.dtype)])
                else:
                    y_TD.backward(grad_TD)
                out[f"{kind}-k{k}"] = {"forward": fwd, "backward": counter.snapshot()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512, help="hidden size")
    parser.add_argument("--d-inner", type=int, default=2048, help="hidden size of each expert FFN")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (4 per rank)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2], help="experts per token (per path)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(common.DTYPES), help="activation dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the 2 ranks are stopped")
    parser.add_argument("--json", default=os.path.join(common.ROOT, "runs", "bench", "bench_comm.json"),
                        help="where to write the JSON record")
    args = parser.parse_args(argv)
    for name in ("d_model", "d_inner", "experts", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.experts % WORLD:
        parser.error(f"--experts: must be divisible by the expert-parallel size {WORLD}, got {args.experts}")
    if any(k < 1 or k > args.experts for k in args.k):
        parser.error(f"--k: every k must be in [1, --experts], got {args.k}")
    device = torch.device("cpu")
    info = common.machine(device)
    info.update(processes=WORLD, backend="gloo", ep_size=WORLD)
    common.print_header("Collectives per training step, 2 gloo ranks, ep_size 2", info, device)

    from tests.harness import run_distributed
    opts = dict(d_model=args.d_model, d_inner=args.d_inner, experts=args.experts, tokens=args.tokens,
                k=sorted(args.k), dtype=args.dtype, seed=args.seed)
    per_rank = run_distributed(_worker, world_size=WORLD, args=(opts, ), timeout=args.timeout)

    rows, table = [], []
    for name in per_rank[0]:
        for phase in ("forward", "backward"):
            counts = [r[name][phase] for r in per_rank]
            a2a_calls = counts[0]["calls"]["all_to_all_single"]
            a2a_bytes = max(c["bytes"]["all_to_all_single"] for c in counts)
            row = {"variant": name, "phase": phase, "per_rank": counts, "all_to_all_calls": a2a_calls,
                   "all_to_all_bytes_per_rank": a2a_bytes,
                   "all_to_all_off_rank_bytes_per_rank": a2a_bytes * (WORLD - 1) // WORLD,
                   "all_reduce_calls": counts[0]["calls"]["all_reduce"],
                   "all_reduce_bytes_per_rank": counts[0]["bytes"]["all_reduce"]}
            rows.append(row)
        fwd, bwd = rows[-2], rows[-1]
        table.append([name, f"{fwd['all_to_all_calls']} + {bwd['all_to_all_calls']}",
                      common.fmt_mib(fwd["all_to_all_bytes_per_rank"] + bwd["all_to_all_bytes_per_rank"]),
                      common.fmt_mib(fwd["all_to_all_off_rank_bytes_per_rank"]
                                     + bwd["all_to_all_off_rank_bytes_per_rank"]),
                      f"{fwd['all_reduce_calls']} + {bwd['all_reduce_calls']}"])
    print(common.markdown_table(["variant", "all-to-all calls (fwd + bwd)", "all-to-all MiB per rank",
                                 "off-rank MiB per rank", "all-reduce calls (fwd + bwd)"], table))
    print(f"\n{args.tokens} tokens per rank, d_model {args.d_model}, {args.experts} experts, {args.dtype}, "
          "capacity factor 1.0 (buffers hold capacity slots, padding included)\n")
    by = {(r["variant"], r["phase"]): r for r in rows}

    def step_bytes(v):
        return by[(v, "forward")]["all_to_all_bytes_per_rank"] + by[(v, "backward")]["all_to_all_bytes_per_rank"]

    def step_calls(v):
        return by[(v, "forward")]["all_to_all_calls"] + by[(v, "backward")]["all_to_all_calls"]

    targets = []
    for k in sorted(args.k):
        targets.append(common.target(f"S2MoE top-{k} all-to-all calls / DeepSpeed MoE top-{k}",
                                     step_calls(f"s2moe-k{k}") / step_calls(f"dsmoe-k{k}"), 1.0,
                                     basis="docs/method.md: one all-to-all pair for both paths"))
    if 1 in args.k and 2 in args.k:
        targets.append(common.target("S2MoE top-1 all-to-all bytes / DeepSpeed MoE top-2 (same expert compute)",
                                     step_bytes("s2moe-k1") / step_bytes("dsmoe-k2"), 1.0, basis="bytes per rank"))
    return common.finish(args, "bench_comm", device, info, rows, targets)


if __name__ == "__main__":
    sys.exit(main())
