"""Sample text from a checkpoint, one expert per token by default (flags: --help, or docs/cli.md)."""

import os
import sys

import torch

from s2moe_ds.checkpoint import load_model, resolve_checkpoint
from s2moe_ds.cli import generate_parser
from s2moe_ds.config import ConfigError
from s2moe_ds.data import load_tokenizer


def main(argv=None) -> int:
    args = generate_parser().parse_args(argv)
    try:
        model, client = load_model(args.checkpoint, eval_k=args.eval_k)
        tokenizer = load_tokenizer(os.path.join(resolve_checkpoint(args.checkpoint), "tokenizer.json"))
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
