"""Train and evaluate variants side by side over seeds, one table (flags: --help, or docs/cli.md)."""

import sys

from s2moe_ds.cli import compare_parser
from s2moe_ds.experiments.runner import run_comparison


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = compare_parser().parse_known_args(argv)
    return run_comparison(args, extra, argv)


if __name__ == "__main__":
    sys.exit(main())
