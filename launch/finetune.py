"""Fine-tune a pretrained checkpoint as a text classifier (flags: --help, or docs/cli.md)."""

from s2moe_ds.cli import exit_with, finetune_from_args, finetune_parser, run_training
from s2moe_ds.train.finetune import finetune


def main(argv=None) -> int:
    def build(args):
        cfg, experiment = finetune_from_args(args)
        return lambda ds_config: finetune(cfg, experiment, ds_config)
    return run_training(finetune_parser().parse_args(argv), build, "ds_configs/finetune.json")


if __name__ == "__main__":
    exit_with(main)
