"""Pretrain an S2MoE (or SMoE, or dense) language model with DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/zero2.json \
        --preset tiny --ep-size 2 --out-dir runs/tiny

Runs under the deepspeed launcher, torchrun and mpirun (DeepSpeed's MPI discovery), on CPU (gloo)
and CUDA (NCCL). Every flag is validated before any compute; errors name the flag's field.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402

from s2moe_ds.cli import add_dataclass_args, given  # noqa: E402
from s2moe_ds.config import ConfigError, MoEConfig, ModelConfig, S2MoEConfig, TrainConfig, model_preset  # noqa: E402
from s2moe_ds.data import DataConfig  # noqa: E402
from s2moe_ds.train import check_ds_config, load_ds_config  # noqa: E402
from s2moe_ds.train.loop import EXIT_REQUEUE, pretrain  # noqa: E402


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset: tiny | paper-small (default: tiny)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_dataclass_args(parser, ModelConfig, "model", skip=("vocab_size", ))
    add_dataclass_args(parser, MoEConfig, "mixture of experts")
    add_dataclass_args(parser, S2MoEConfig, "S2MoE")
    add_dataclass_args(parser, DataConfig, "data")
    add_dataclass_args(parser, TrainConfig, "training")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        moe = given(args, MoEConfig)
        moe["s2moe"] = given(args, S2MoEConfig)
        model_cfg = model_preset(args.preset, **given(args, ModelConfig, skip=("vocab_size", )), moe=moe)
        data_cfg = DataConfig(**given(args, DataConfig))
        train_cfg = TrainConfig(**given(args, TrainConfig))
        if not args.deepspeed_config:
            raise ConfigError("--deepspeed_config: required, e.g. ds_configs/zero2.json")
        ds_config = load_ds_config(args.deepspeed_config)
        check_ds_config(ds_config)
        final = pretrain(model_cfg, data_cfg, train_cfg, ds_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return EXIT_REQUEUE if final["stopped_by"] else 0


if __name__ == "__main__":
    sys.exit(main())
