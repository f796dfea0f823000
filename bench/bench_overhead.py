"""What S2MoE's extras cost: the noise module, the InfoNCE uncertainty loss, the concat and the
mixing gate, as shares of the S2MoE layer's forward + backward.

    .venv/bin/python bench/bench_overhead.py                 # the bench_layer sizes, k = 2
    .venv/bin/python bench/bench_overhead.py --k 1 --profile

Timed in one process, interleaved, each forward + backward on the same tokens:
- s2moe:          the full layer (docs/method.md's defaults);
- s2moe-plain:    the same layer with its fused paths off (S2MoEConfig.fused false): the plain
                  autograd graph of the noisy concat, the path mix and InfoNCE, i.e. before the optimisations;
- s2moe-no-lu:    the same layer with uncertainty_coef 0 (no InfoNCE);
- smoe-2T:        DeepSpeed's MoE on the 2T concatenated tokens: the routing and expert work
                  inside S2MoE, without any of its extras;
- noise+concat:   S2MoE.noisy_pair alone: statistics, sampling, the [x; x_hat] buffer;
- info_nce:       sampled_info_nce(x, x_hat) alone (uncertainty_tokens rows);
- gate+mix:       the mixing gate and g * y + (1 - g) * y_hat alone (with the fused paths the mix
                  is DeepSpeed's combine with other weights, so this is the gate and its weights);
- ... (plain):    those three with the fused paths off.
With --profile, torch.profiler's top operators of one full S2MoE call are printed too.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_layer import build_layer, fwd_bwd, make_inputs  # noqa: E402


def component_calls(layer, x_TD: torch.Tensor, grad_TD: torch.Tensor) -> dict:
    """The S2MoE extras, each as the layer runs it (fused or plain as its config says), forward +
    backward."""
    from s2moe_ds.moe import fused, method
    cfg = layer.config
    ops = fused if cfg.fused else method
    T = x_TD.shape[0]
    grad_2TD = torch.cat([grad_TD, grad_TD])
    y_2TD = torch.randn(2 * T, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device).requires_grad_()

    def noise_concat() -> None:
        x_TD.grad = None
        both_2TD, _ = layer.noisy_pair(x_TD)
        both_2TD.backward(grad_2TD)

    # Drawn once, outside the timed call: the draw is the 'noise+concat' row's cost.
    x_hat_TD = layer.noise(x_TD).detach().requires_grad_()

    def info_nce() -> None:
        x_TD.grad = x_hat_TD.grad = None
        method.sampled_info_nce(x_TD, x_hat_TD, cfg.uncertainty_tau, cfg.uncertainty_tokens,
                                loss=ops.info_nce).backward()

    grad_2T = torch.randn(2 * T, dtype=torch.float32, device=x_TD.device)

    def gate_mix() -> None:
        x_TD.grad = y_2TD.grad = None
        layer.mix_gate.zero_grad(set_to_none=True)
        g_T1 = torch.sigmoid(ops.mix_gate_logit(x_TD, layer.mix_gate.weight, layer.mix_gate.bias))
        if layer.mixes_in_combine():
            # The mix itself is DeepSpeed's combine with other weights: only the gate is extra.
            torch.cat([g_T1, 1.0 - g_T1]).reshape(-1).backward(grad_2T)
        else:
            ops.mix_paths(g_T1, y_2TD).backward(grad_TD)

    return {"noise+concat": noise_concat, "info_nce": info_nce, "gate+mix": gate_mix}


def profile_top_ops(call, rows: int = 12) -> list:
    from torch.profiler import ProfilerActivity, profile
    call()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:rows]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_layer_shape_args(parser)
    parser.add_argument("--k", type=int, default=2, help="experts per token per path")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators")
    common.add_common_args(parser, "bench_overhead.json", warmup=1, reps=7)
    args = parser.parse_args(argv)
    common.check_layer_args(parser, args)
    device, dtype, info = common.start_single_process(args, "S2MoE overhead: noise, InfoNCE, concat and mixing gate")

    x_TD, grad_TD = make_inputs(args.tokens, args.d_model, device, dtype, args.seed)
    x2_TD, grad2_TD = make_inputs(2 * args.tokens, args.d_model, device, dtype, args.seed + 1)
    layers = {}
    for name, kind, kw in (("s2moe", "s2moe", {}), ("s2moe-plain", "s2moe", dict(fused=False)),
                           ("s2moe-no-lu", "s2moe", dict(uncertainty_coef=0.0)), ("smoe-2T", "dsmoe", {})):
        torch.manual_seed(args.seed)
        layers[name] = build_layer(kind, args.k, args.d_model, args.d_inner, args.experts, **kw)
        layers[name].to(device=device, dtype=dtype).train()
        common.wire_moe_groups(layers[name])
    calls = {"s2moe": fwd_bwd(layers["s2moe"], x_TD, grad_TD),
             "s2moe-plain": fwd_bwd(layers["s2moe-plain"], x_TD, grad_TD),
             "s2moe-no-lu": fwd_bwd(layers["s2moe-no-lu"], x_TD, grad_TD),
             "smoe-2T": fwd_bwd(layers["smoe-2T"], x2_TD, grad2_TD),
             **component_calls(layers["s2moe"], x_TD, grad_TD),
             **{f"{name} (plain)": call for name, call in
                component_calls(layers["s2moe-plain"], x_TD, grad_TD).items()}}
    timings = common.time_interleaved(calls, device, args.warmup, args.reps)
    peaks = {} if args.no_memory else {n: common.peak_bytes(calls[n], device)
                                       for n in ("s2moe", "s2moe-plain", "s2moe-no-lu", "smoe-2T")}
    rows, table = [], []
    for name, t in timings.items():
        share = common.paired_ratio(timings, name, "s2moe")
        rows.append({"variant": name, **common.timing_record(t, args.tokens), "share_of_s2moe": share,
                     "peak_bytes": peaks.get(name)})
        table.append([name, common.fmt_time(t), f"{100 * share['median']:.1f}% [{100 * share['q1']:.1f}, "
                      f"{100 * share['q3']:.1f}]", common.fmt_mib(peaks.get(name))])
    lu = common.paired_ratio(timings, "s2moe-no-lu", "s2moe")
    plain = common.paired_ratio(timings, "s2moe-plain", "s2moe")
    derived = {"uncertainty_loss_share": 1 - lu["median"], "plain_over_fused_time": plain["median"],
               "plain_over_fused_peak": peaks["s2moe-plain"] / peaks["s2moe"] if peaks else None,
               "extras_share": 1 - common.paired_ratio(timings, "smoe-2T", "s2moe")["median"]}
    print(common.markdown_table(["variant", "ms/call median [IQR]", "time / s2moe, paired median [IQR]",
                                 "peak MiB"], table))
    print(f"\n{args.tokens} tokens, d_model {args.d_model}, d_inner {args.d_inner}, {args.experts} experts, "
          f"top-{args.k} per path, {args.dtype}")
    print(f"InfoNCE share (1 - time(no L_u) / time(s2moe)): {100 * derived['uncertainty_loss_share']:.1f}%; "
          f"all S2MoE extras (1 - time(DeepSpeed MoE on 2T) / time(s2moe)): {100 * derived['extras_share']:.1f}%; "
          f"plain / fused: time {plain['median']:.3f} [{plain['q1']:.3f}, {plain['q3']:.3f}]"
          + (f", peak memory {derived['plain_over_fused_peak']:.3f}" if peaks else ""))
    extra = {"derived": derived}
    if args.profile:
        top = profile_top_ops(calls["s2moe"])
        extra["profile_top_ops"] = top
        print("\ntorch.profiler, one full S2MoE forward + backward, top operators by self CPU time:\n")
        print(common.markdown_table(["op", "self CPU ms", "share", "calls"],
                                    [[r["op"], f"{r['self_cpu_ms']:.1f}", f"{100 * r['share']:.1f}%", r["calls"]]
                                     for r in top]))
    return common.finish(args, "bench_overhead", device, info, rows, extra=extra)


if __name__ == "__main__":
    sys.exit(main())
