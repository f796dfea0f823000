"""Turn a checkpoint into one fp32 file that loads without DeepSpeed (flags: --help, or docs/cli.md)."""

import os
import sys

import torch

from s2moe_ds.checkpoint import consolidate, model_config_for_inference
from s2moe_ds.cli import consolidate_parser
from s2moe_ds.config import ConfigError


def main(argv=None) -> int:
    args = consolidate_parser().parse_args(argv)
    try:
        state, client = consolidate(args.checkpoint, args.tag)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = model_config_for_inference(client).to_dict()
    tmp = args.out + ".tmp"
    torch.save({"state_dict": state, "model_config": config, "tokenizer": client.get("tokenizer")}, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
