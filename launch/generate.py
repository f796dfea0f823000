"""Sample text from a checkpoint, one expert per token by default (flags: --help, or docs/cli.md)."""

import os
import sys

import torch

from s2moe_ds.checkpoint import load_model, resolve_checkpoint
from s2moe_ds.cli import generate_parser
from s2moe_ds.config import ConfigError, is_finite_number, require
from s2moe_ds.data import load_tokenizer


def check_sampling_flags(args) -> None:
    """Refuse what would sample nothing, fail mid-way or be read as something else (a negative
    temperature was taken as greedy), before the checkpoint is read."""
    require(args.top_k is None or args.top_k >= 1, "--top-k",
            f"must be >= 1 (sample among the k likeliest tokens), got {args.top_k}; leave it out to sample among all")
    require(is_finite_number(args.temperature) and args.temperature >= 0, "--temperature",
            f"must be a finite number >= 0 (0 always takes the likeliest token), got {args.temperature}")
    require(args.max_new_tokens >= 0, "--max-new-tokens", f"must be >= 0, got {args.max_new_tokens}")
    require(args.num_samples >= 1, "--num-samples", f"must be >= 1, got {args.num_samples}")
    require(args.eval_k >= 1, "--eval-k", f"must be >= 1 (experts per token), got {args.eval_k}")


def main(argv=None) -> int:
    args = generate_parser().parse_args(argv)
    try:
        check_sampling_flags(args)
        step_dir = resolve_checkpoint(args.checkpoint)
        model, client = load_model(step_dir, eval_k=args.eval_k)
        # The step folder's own tokenizer: the checkpoint's recorded data settings are never read here.
        tokenizer = load_tokenizer(os.path.join(step_dir, "tokenizer.json"))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt_ids = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long).reshape(1, -1)
    if prompt_ids.numel() == 0:
        print("error: --prompt: encodes to no tokens; give a non-empty prompt", file=sys.stderr)
        return 2
    unknown = sorted({c for c in args.prompt if tokenizer.decode(tokenizer.encode(c)) != c})
    if unknown:
        print(f"warning: --prompt: {', '.join(map(repr, unknown))} not in the tokenizer's vocabulary; the model "
              "reads them as its unknown symbol (shown as U+FFFD)", file=sys.stderr)
    g = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        out = model.generate(prompt_ids, args.max_new_tokens, args.temperature, args.top_k, generator=g)
        print(f"--- sample {i + 1} (eval_k={model.cfg.moe.resolved_eval_k}, step {client.get('step')}) ---")
        print(tokenizer.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
