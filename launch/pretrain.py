"""Pretrain a language model with DeepSpeed (flags: --help, or docs/cli.md)."""

from s2moe_ds.cli import exit_with, experiment_from_args, pretrain_parser, run_training
from s2moe_ds.train import pretrain


def main(argv=None) -> int:
    def build(args):
        experiment = experiment_from_args(args)
        return lambda ds_config: pretrain(experiment, ds_config)
    return run_training(pretrain_parser().parse_args(argv), build, "ds_configs/zero2.json")


if __name__ == "__main__":
    exit_with(main)
