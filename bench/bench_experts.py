"""The local experts of a MoE layer: DeepSpeed's loop against one batched matmul (moe.expert_impl).

    .venv/bin/python bench/bench_experts.py                  # paper-small: d_model 256, d_inner 512, 8 experts, 4096 tokens
    .venv/bin/python bench/bench_experts.py --dtype bf16
    .venv/bin/python bench/bench_experts.py --d-model 64 --d-inner 128 --experts 16   # small experts

Variants, all in one process, timed interleaved: {dsmoe, s2moe} x {loop, batched}, top-2 (per
path for S2MoE), each in a training call (forward + backward) and an eval forward. 'loop' is
DeepSpeed's Experts (one FFN call per local expert), 'batched' is moe/experts.py's BatchedExperts
over the same expert modules. Same weights on both sides. The target on any device: batched no
slower than the loop in a training call (paired median ratio <= 1.0); on a GPU, where the loop is
launch-bound, the GPU suite (bench/gpu_suite.py) asks for 5x.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_layer import build_layer, fwd_bwd, make_inputs, paths  # noqa: E402

IMPLS = ("loop", "batched")


def use_impl(layer: torch.nn.Module, impl: str) -> torch.nn.Module:
    """DeepSpeed's MoE or our S2MoE with its experts computed by `impl`."""
    from s2moe_ds.moe.experts import BatchedExperts
    from s2moe_ds.parallel import deepspeed_internals as ds
    if impl == "batched":
        ds.set_experts_module(layer, BatchedExperts(ds.experts_module(layer)))
    return layer


def in_mode(layer: torch.nn.Module, train: bool, call):
    """`call` with the layer in training or eval mode (each layer is timed in both)."""
    def run() -> None:
        layer.train(train)
        call()
    return run


def forward_only(layer: torch.nn.Module, x_TD: torch.Tensor):
    def call() -> None:
        with torch.no_grad():
            layer(x_TD)
    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_layer_shape_args(parser)
    parser.set_defaults(d_model=256, d_inner=512, experts=8, tokens=4096)
    parser.add_argument("--k", type=int, default=2, help="experts per token (per path for S2MoE)")
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="DeepSpeed's capacity factor")
    parser.add_argument("--target", type=float, default=1.0,
                        help="largest passing batched / loop time ratio of a training call (default 1.0)")
    common.add_common_args(parser, "bench_experts.json", warmup=1, reps=7)
    args = parser.parse_args(argv)
    common.check_layer_args(parser, args)
    device, dtype, info = common.start_single_process(args, "Local experts: DeepSpeed's loop vs one batched matmul")

    x_TD, grad_TD = make_inputs(args.tokens, args.d_model, device, dtype, args.seed)
    layers = {}
    for kind in ("dsmoe", "s2moe"):
        for impl in IMPLS:
            torch.manual_seed(args.seed)  # the same weights for both implementations
            layer = build_layer(kind, args.k, args.d_model, args.d_inner, args.experts,
                                capacity_factor=args.capacity_factor)
            layers[(kind, impl)] = use_impl(layer.to(device=device, dtype=dtype), impl)
            common.wire_moe_groups(layers[(kind, impl)])
    calls = {}
    for (kind, impl), layer in layers.items():
        calls[f"{kind}-{impl}-train"] = in_mode(layer, True, fwd_bwd(layer, x_TD, grad_TD))
        calls[f"{kind}-{impl}-eval"] = in_mode(layer, False, forward_only(layer, x_TD))
    timings = common.time_interleaved(calls, device, args.warmup, args.reps)

    peak = common.peak_tflops(device, args.dtype)
    rows, table, targets = [], [], []
    for kind in ("dsmoe", "s2moe"):
        for mode in ("train", "eval"):
            loop, batched = f"{kind}-loop-{mode}", f"{kind}-batched-{mode}"
            ratio = common.paired_ratio(timings, batched, loop)
            # The experts' matmuls only (2 per expert, 2 * D * H FLOPs per route each), x3 with the
            # backward; the eval forward routes the clean tokens only.
            routes = args.k * (paths(kind) if mode == "train" else 1)
            flops = routes * 4 * args.d_model * args.d_inner * (3 if mode == "train" else 1)
            for name in (loop, batched):
                rows.append({"variant": name, "tokens": args.tokens, **common.timing_record(timings[name], args.tokens),
                             **common.throughput(flops, args.tokens, timings[name].median, peak),
                             "time_vs_loop": ratio if name == batched else None})
            loop_row, batched_row = rows[-2], rows[-1]
            table.append([f"{kind} {mode}", common.fmt_time(timings[loop]), common.fmt_time(timings[batched]),
                          f"{ratio['median']:.3f} [{ratio['q1']:.3f}, {ratio['q3']:.3f}]",
                          f"{loop_row['tflops']:.3f} / {batched_row['tflops']:.3f}",
                          "-" if peak is None else f"{loop_row['mfu']:.1%} / {batched_row['mfu']:.1%}"])
            if mode == "train":
                targets.append(common.target(f"{kind} top-{args.k} training call: batched / loop experts",
                                             ratio["median"], args.target, basis="paired median time ratio"))
    print(common.markdown_table(["layer", "loop ms median [IQR]", "batched ms median [IQR]",
                                 "batched / loop [IQR]", "expert TFLOP/s loop / batched", "MFU loop / batched"],
                                table))
    print(f"\n{args.tokens} tokens, d_model {args.d_model}, d_inner {args.d_inner}, {args.experts} experts, "
          f"top-{args.k}, {args.dtype}, capacity factor {args.capacity_factor}, {device.type}\n")
    return common.finish(args, "bench_experts", device, info, rows, targets)


if __name__ == "__main__":
    sys.exit(main())
