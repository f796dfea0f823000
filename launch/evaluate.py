"""Evaluate a checkpoint with one and with two experts per token (flags: --help, or docs/cli.md)."""

import os
import sys

from s2moe_ds.cli import eval_config_from_args, evaluate_parser
from s2moe_ds.config import ConfigError
from s2moe_ds.eval.evaluate import evaluate_checkpoint, report_table


def main(argv=None) -> int:
    args = evaluate_parser().parse_args(argv)
    try:
        report = evaluate_checkpoint(eval_config_from_args(args))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    routing = f"block {report['block']}" + (f", router {report['router']}" if report["router"] else "")
    print(f"\ncheckpoint {report['checkpoint']} (step {report['step']}, {routing})")
    print(report_table(report))
    print(f"\nreport: {os.path.join(report['out_dir'], 'eval.json')}")
    if report["analysis"]:
        print(f"analysis: {os.path.join(report['out_dir'], 'analysis.json')} and plots/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
