"""Sample text from a checkpoint, with one expert per token by default (S2MoE's inference mode).

    python launch/generate.py --checkpoint runs/tiny --prompt "The " --max-new-tokens 200
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from s2moe_ds.config import ConfigError  # noqa: E402
from s2moe_ds.data.tokenization import load_tokenizer  # noqa: E402
from s2moe_ds.train.consolidate import load_model, resolve_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, its checkpoints/ folder, or a step folder")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--eval-k", type=int, default=1, help="experts per token (default 1)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model, client = load_model(args.checkpoint, eval_k=args.eval_k)
        tokenizer = load_tokenizer(os.path.join(resolve_checkpoint(args.checkpoint), "tokenizer.json"))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt_ids = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long).reshape(1, -1)
    if prompt_ids.numel() == 0:
        print("error: --prompt encodes to no tokens", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        out = model.generate(prompt_ids, args.max_new_tokens, args.temperature, args.top_k, generator=g)
        print(f"--- sample {i + 1} (eval_k={model.cfg.moe.resolved_eval_k}, step {client.get('step')}) ---")
        print(tokenizer.decode(out[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
