"""Fine-tune a pretrained checkpoint as a text classifier (flags: --help, or docs/cli.md)."""

import sys

from s2moe_ds.cli import finetune_from_args, finetune_parser
from s2moe_ds.config import ConfigError
from s2moe_ds.parallel import check_ds_config, load_ds_config
from s2moe_ds.train import EXIT_REQUEUE
from s2moe_ds.train.finetune import finetune


def main(argv=None) -> int:
    args = finetune_parser().parse_args(argv)
    try:
        cfg, experiment = finetune_from_args(args)
        if not args.deepspeed_config:
            raise ConfigError("--deepspeed_config: required, e.g. ds_configs/finetune.json")
        ds_config = load_ds_config(args.deepspeed_config)
        check_ds_config(ds_config)
        final = finetune(cfg, experiment, ds_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return EXIT_REQUEUE if final["stopped_by"] else 0


if __name__ == "__main__":
    sys.exit(main())
