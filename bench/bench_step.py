"""A full training step (forward, backward, AdamW step) of the language model, per router.

    .venv/bin/python bench/bench_step.py                           # tiny and paper-small, 2048 tokens/step
    .venv/bin/python bench/bench_step.py --presets paper-small --dtype bf16

Variants per preset, timed in one process, interleaved: smoe-k2 (DeepSpeed's MoE, top-2, the
paper's baseline), s2moe-k2, s2moe-k1 (S2MoE with k experts per path), s2moe-lite-k2 (the lite
form: no noisy dispatch, InfoNCE only), dense (the preset's dense FFN, d_inner hidden units). The loss is the one the trainer optimises:
task + balance_coef * L_balance + uncertainty_coef * L_u. Plain torch AdamW on one process with a
world-size-1 DeepSpeed process group (expert-parallel size 1).

Memory: 'state' is parameters + AdamW state (live between steps); 'step peak' is the most the step
allocates on top of that (activations, gradients, temporaries); 'total' is their sum, what
torch.cuda.max_memory_allocated would show for the step.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import common  # noqa: E402

VARIANTS = {  # name -> MoE config overrides
    "smoe-k2": dict(block="moe", k=2),
    "s2moe-k2": dict(block="s2moe", k=2),
    "s2moe-k1": dict(block="s2moe", k=1),
    # The lite form: SMoE's dispatch plus InfoNCE on the layer's input (docs/method.md section 9).
    "s2moe-lite-k2": dict(block="s2moe", k=2, block_config=dict(noisy_dispatch=False)),
    "dense": dict(block="dense"),
}


def build_model(preset: str, moe: dict, device, dtype, seed: int, overrides=None):
    from s2moe_ds.models import build_model as build
    from s2moe_ds.train import model_preset
    overrides = dict(overrides or {})
    moe = {**overrides.pop("moe", {}), **moe}
    cfg = model_preset(preset, **overrides, moe=moe)
    torch.manual_seed(seed)
    model = build(cfg).to(device=device, dtype=dtype)
    common.wire_moe_groups(model)
    return cfg, model


def train_step(model, cfg, optimizer, idx_BT, targets_BT):
    from s2moe_ds.moe import total_loss
    terms = cfg.moe.loss_terms()

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        out = model(idx_BT, targets_BT)
        total_loss(out.task_loss, out.layer_losses, terms)[0].backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper-small"],
                        help="model presets of s2moe_ds.train.presets (tiny, paper-small)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="blocks to compare; smoe-k2 is the reference of every ratio")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch = tokens / seq-len)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: the preset's max_seq_len, at most 512)")
    parser.add_argument("--expert-impl", default="loop", choices=("loop", "batched"),
                        help="moe.expert_impl of every MoE variant (default: loop, DeepSpeed's)")
    parser.add_argument("--model-overrides", type=json.loads, default={},
                        help='JSON of ModelConfig fields laid over every preset, e.g. \'{"d_model": 1024, '
                             '"moe": {"num_experts": 16}}\' for a GPU-sized model')
    common.add_common_args(parser, "bench_step.json", warmup=2, reps=5)
    args = parser.parse_args(argv)
    if not isinstance(args.model_overrides, dict):
        parser.error("--model-overrides: must be a JSON object of ModelConfig fields")
    common.check_positive(parser, args, ["tokens", "seq-len", "reps"])
    if "smoe-k2" not in args.variants:
        parser.error("--variants: must include smoe-k2 (the reference of every ratio)")
    from s2moe_ds.train import PRESETS, model_preset
    for preset in args.presets:
        if preset not in PRESETS:
            parser.error(f"--presets: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    device, dtype, info = common.start_single_process(args, "Training step (forward, backward, AdamW)")
    from s2moe_ds.eval.flops import flops_per_token
    peak = common.peak_tflops(device, args.dtype)

    rows, targets = [], []
    for preset in args.presets:
        base = model_preset(preset, **{k: v for k, v in args.model_overrides.items() if k != "moe"})
        max_len = base.max_seq_len
        seq_len = min(args.seq_len or min(max_len, 512), max_len)
        batch = max(1, args.tokens // seq_len)
        tokens = batch * seq_len
        g = torch.Generator().manual_seed(args.seed)
        vocab = base.vocab_size
        idx_BT = torch.randint(vocab, (batch, seq_len + 1), generator=g).to(device)
        inputs_BT, targets_BT = idx_BT[:, :-1].contiguous(), idx_BT[:, 1:].contiguous()
        steps, states = {}, {}
        for name in args.variants:
            moe = VARIANTS[name] if name == "dense" else {**VARIANTS[name], "expert_impl": args.expert_impl}
            cfg, model = build_model(preset, moe, device, dtype, args.seed, args.model_overrides)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps[name] = train_step(model, cfg, optimizer, inputs_BT, targets_BT)
            states[name] = (model, optimizer, cfg)
        timings = common.time_interleaved(steps, device, max(args.warmup, 1), args.reps)
        peaks = {} if args.no_memory else {n: common.peak_bytes(s, device) for n, s in steps.items()}
        table = []
        for name in args.variants:
            model, optimizer, cfg = states[name]
            state_bytes = common.tensor_bytes(model.parameters()) + common.optimizer_state_bytes(optimizer)
            step_peak = peaks.get(name)
            ratio = common.paired_ratio(timings, name, "smoe-k2")
            row = {"preset": preset, "variant": name, "batch": batch, "seq_len": seq_len, "tokens": tokens,
                   **common.timing_record(timings[name], tokens), "time_vs_smoe_k2": ratio,
                   "state_bytes": state_bytes, "step_peak_bytes": step_peak,
                   "total_peak_bytes": None if step_peak is None else state_bytes + step_peak,
                   "params": sum(p.numel() for p in model.parameters()),
                   **common.throughput(flops_per_token(cfg, seq_len, training=True)["total"], tokens,
                                       timings[name].median, peak)}
            rows.append(row)
            table.append([preset, name, common.fmt_time(timings[name]), f"{row['tokens_per_s']:,.0f}",
                          f"{ratio['median']:.2f} [{ratio['q1']:.2f}, {ratio['q3']:.2f}]",
                          common.fmt_mib(state_bytes), common.fmt_mib(step_peak), common.fmt_mib(row["total_peak_bytes"]),
                          f"{row['tflops']:.3f}", "-" if row["mfu"] is None else f"{row['mfu']:.1%}"])
        print(common.markdown_table(["preset", "variant", "ms/step median [IQR]", "tokens/s",
                                     "time / smoe-k2 [IQR]", "state MiB", "step peak MiB", "total MiB",
                                     "TFLOP/s", "MFU"], table))
        print(f"\n{preset}: batch {batch} x seq {seq_len} = {tokens} tokens/step, {args.dtype}\n", flush=True)
        by = {r["variant"]: r for r in rows if r["preset"] == preset}
        if "s2moe-k1" in by:
            # Issue 6 asked 1.10 of every preset; issue 16 allows the tiny preset, where the
            # extras weigh most next to its small experts, 1.15.
            targets.append(common.target(f"{preset}: S2MoE top-1 step time / DeepSpeed MoE top-2",
                                         by["s2moe-k1"]["time_vs_smoe_k2"]["median"], 1.15 if preset == "tiny" else 1.10,
                                         basis="paired median time ratio"))
            if peaks:
                targets.append(common.target(
                    f"{preset}: S2MoE top-1 step peak memory / DeepSpeed MoE top-2 (same tokens, 2 routes/token each)",
                    by["s2moe-k1"]["total_peak_bytes"] / by["smoe-k2"]["total_peak_bytes"], 1.3,
                    basis="state + step peak"))
    return common.finish(args, "bench_step", device, info, rows, targets)


if __name__ == "__main__":
    sys.exit(main())
