"""Turn a checkpoint (ZeRO 0/1/2, any ep_size) into one fp32 file that loads without DeepSpeed.

    python launch/consolidate.py runs/tiny --out runs/tiny/model_fp32.pt

The file holds {"state_dict", "model_config", "tokenizer"}; load it with
LanguageModel(ModelConfig(**model_config)).load_state_dict(state_dict).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from s2moe_ds.config import ConfigError  # noqa: E402
from s2moe_ds.train.consolidate import consolidate, model_config_for_inference  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder, its checkpoints/ folder, or a step folder")
    parser.add_argument("--tag", default=None, help="step folder name (default: latest)")
    parser.add_argument("--out", required=True, help="output file (.pt)")
    args = parser.parse_args(argv)
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
