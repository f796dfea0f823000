"""Inference tokens/s with one and with two experts per token, next to the analytic FLOPs ratio.

    .venv/bin/python bench/bench_inference.py                       # paper-small, S2MoE, 4 x 512 tokens
    .venv/bin/python bench/bench_inference.py --preset tiny --block moe

One model (the preset with k=2 in training) is evaluated in eval mode with eval_k 1 and eval_k 2:
two copies with identical weights, timed in one process, interleaved, under torch.inference_mode.
S2MoE in eval mode routes the clean tokens only (docs/method.md: x_hat = x), so eval_k 1 is a plain
top-1 MoE forward. The analytic column is s2moe_ds.eval.flops: flops_per_token at each eval_k and
inference_cost_ratio(1 vs 2). --balance-steps N first trains the routers alone on the balance
loss, so that routing is as balanced as a trained model's (random-init routers are not).

Two capacity modes, each with its own pair (all four timed together):
- nodrop: the project's default (moe.eval_drop_tokens false): no token is dropped, so every
  expert's buffer is as large as the busiest expert's load, and padded rows are computed too;
- cap1.0: DeepSpeed's own eval behaviour (eval_drop_tokens true, eval_capacity_factor 1.0): each
  expert holds ceil(k * T / E) tokens, so the expert work is exactly k * T rows.
'padding' is the expert rows computed over the k * T rows routed (1.0 = no waste).
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402


MODES = {
    "nodrop": dict(eval_drop_tokens=False),
    "cap1.0": dict(eval_drop_tokens=True, eval_capacity_factor=1.0),
}


def expert_padding(model, k: int, tokens: int) -> float:
    """Expert rows computed in the last forward over the k * tokens rows routed, averaged over
    MoE layers. DeepSpeed sizes every expert buffer alike: capacity = the busiest expert's load
    without drops, ceil(k * T / E * factor) with them."""
    from s2moe_ds.moe import expert_blocks
    from s2moe_ds.parallel import deepspeed_internals as ds
    ratios = []
    for layer in expert_blocks(model):
        gate = ds.gate_arguments(layer.router)
        counts_E = ds.last_expert_counts(layer)
        num_experts = counts_E.numel()
        if layer.router.eval_drop_tokens:
            capacity = max(math.ceil(tokens / num_experts * gate["eval_capacity_factor"] * k), gate["min_capacity"])
        else:
            capacity = int(counts_E.max())
        ratios.append(num_experts * capacity / (k * tokens))
    return sum(ratios) / len(ratios)


def balance_routers(model, idx_BT: torch.Tensor, steps: int, lr: float = 1e-3) -> list:
    """Train only the routers, on the load-balancing loss, as training would have: a random-init
    router sends most tokens to a few experts, which without drops sets every expert's buffer
    size. Returns the balance loss per step."""
    from s2moe_ds.moe import expert_blocks
    from s2moe_ds.parallel import deepspeed_internals as ds
    routers = [ds.gate_weight(layer.router) for layer in expert_blocks(model)]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in routers:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(routers, lr=lr)
    curve = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(model(idx_BT).layer_losses["balance"])
        loss.backward()
        optimizer.step()
        curve.append(loss.item() / len(routers))
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper-small", help="model preset of s2moe_ds.train.presets")
    parser.add_argument("--block", default="s2moe", choices=("s2moe", "moe"), help="the MoE block kind")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--balance-steps", type=int, default=30,
                        help="first train the routers alone on the balance loss for this many steps (eval "
                             "forward), so that routing is as balanced as after training; 0: random-init routers")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="eval capacity modes to compare (see above)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's max_seq_len)")
    common.add_common_args(parser, "bench_inference.json", warmup=2, reps=9)
    args = parser.parse_args(argv)
    common.check_positive(parser, args, ["batch", "seq-len", "reps"])
    if args.balance_steps < 0:
        parser.error(f"--balance-steps: must be >= 0, got {args.balance_steps}")
    from s2moe_ds.eval.flops import flops_per_token, inference_cost_ratio
    from s2moe_ds.models import build_model
    from s2moe_ds.train import PRESETS, model_preset
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    device, dtype, info = common.start_single_process(args, "Inference: one vs two experts per token")

    base = model_preset(args.preset)
    seq_len = min(args.seq_len or base.max_seq_len, base.max_seq_len)
    tokens = args.batch * seq_len
    idx_BT = torch.randint(base.vocab_size, (args.batch, seq_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    models, cfgs = {}, {}
    balance_curve = []
    for mode in args.modes:
        for eval_k in (1, 2):
            moe = dict(block=args.block, k=2, eval_k=eval_k, **MODES[mode])
            cfg = model_preset(args.preset, moe=moe)
            torch.manual_seed(args.seed)
            model = build_model(cfg).to(device=device, dtype=dtype).eval()
            common.wire_moe_groups(model)
            if models:
                model.load_state_dict(next(iter(models.values())).state_dict())
            elif args.balance_steps:
                balance_curve = balance_routers(model, idx_BT, args.balance_steps)
            models[f"{mode}/eval_k{eval_k}"], cfgs[f"{mode}/eval_k{eval_k}"] = model, cfg
    if balance_curve:
        print(f"router balancing: {args.balance_steps} steps, balance loss {balance_curve[0]:.3f} -> "
              f"{balance_curve[-1]:.3f} (1.0 per layer is perfect balance)\n")

    def forward(model):
        def call() -> None:
            with torch.inference_mode():
                model(idx_BT)
        return call

    calls = {name: forward(model) for name, model in models.items()}
    timings = common.time_interleaved(calls, device, args.warmup, args.reps)
    peaks = {} if args.no_memory else {n: common.peak_bytes(c, device) for n, c in calls.items()}
    analytic_ratio = inference_cost_ratio(next(iter(cfgs.values())), seq_len, 1, 2)
    speedups = {mode: common.paired_ratio(timings, f"{mode}/eval_k2", f"{mode}/eval_k1") for mode in args.modes}

    rows, table = [], []
    for name, cfg in cfgs.items():
        flops = flops_per_token(cfg, seq_len, cfg.moe.resolved_eval_k)["total"]
        k = cfg.moe.resolved_eval_k
        padding = expert_padding(models[name], k, tokens)
        row = {"variant": name, "eval_k": k, "eval_drop_tokens": cfg.moe.eval_drop_tokens, "tokens": tokens,
               **common.timing_record(timings[name], tokens), "peak_bytes": peaks.get(name),
               "analytic_flops_per_token": flops, "expert_padding": padding,
               "achieved_gflops": flops * tokens / timings[name].median / 1e9}
        rows.append(row)
        table.append([name, common.fmt_time(timings[name]), f"{row['tokens_per_s']:,.0f}",
                      f"{flops / 1e6:.2f}", f"{row['achieved_gflops']:.1f}", f"{padding:.2f}",
                      common.fmt_mib(row["peak_bytes"])])
    print(common.markdown_table(["variant", "ms/forward median [IQR]", "tokens/s", "analytic MFLOPs/token",
                                 "achieved GFLOP/s", "padding", "peak MiB"], table))
    print(f"\n{args.preset}, block {args.block}, batch {args.batch} x seq {seq_len} = {tokens} tokens, {args.dtype}; "
          f"analytic inference_cost_ratio(1 vs 2) = {analytic_ratio:.3f}, i.e. {1 / analytic_ratio:.3f}x tokens/s\n")
    targets = [common.target(f"{args.preset} ({mode}): one-expert inference tokens/s / two-expert", s["median"], 1.3,
                             higher_is_better=True,
                             basis=f"paired median [IQR {s['q1']:.2f}, {s['q3']:.2f}]; "
                                   f"analytic {1 / analytic_ratio:.3f}x")
               for mode, s in speedups.items()]
    return common.finish(args, "bench_inference", device, info, rows, targets,
                         extra={"analytic_cost_ratio": analytic_ratio, "measured_speedup": speedups,
                                "balance_loss_curve": balance_curve})


if __name__ == "__main__":
    sys.exit(main())
