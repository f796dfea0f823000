"""Evaluate a checkpoint with one and with two experts per token, next to the inference FLOPs.

    python launch/evaluate.py --checkpoint runs/tiny                 # valid + test, eval_k 1 and 2
    python launch/evaluate.py --checkpoint runs/tiny --analysis      # + what the experts learned

Any checkpoint of launch/pretrain.py works, whatever its ZeRO stage, process count or ep_size: it
is consolidated and evaluated on one process (CUDA if present). Full passes over each split, no
sampling: every number but tokens/s is identical from run to run. Writes <run>/eval/<step>/eval.json,
and with --analysis analysis.json, plots/*.png and TensorBoard events (tensorboard/).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2moe_ds.cli import add_dataclass_args, given  # noqa: E402
from s2moe_ds.config import ConfigError  # noqa: E402
from s2moe_ds.data import DataConfig  # noqa: E402
from s2moe_ds.eval.evaluate import EvalConfig, evaluate_checkpoint, markdown_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, EvalConfig, "evaluation", skip=("data_overrides", ))
    add_dataclass_args(parser, DataConfig, "data (overrides of the checkpoint's data settings)")
    args = parser.parse_args(argv)
    try:
        cfg = EvalConfig(**given(args, EvalConfig, skip=("data_overrides", )),
                         data_overrides=given(args, DataConfig))
        report = evaluate_checkpoint(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\ncheckpoint {report['checkpoint']} (step {report['step']}, router {report['router']})")
    print(markdown_table(report))
    print(f"\nreport: {os.path.join(report['out_dir'], 'eval.json')}")
    if report["analysis"]:
        print(f"analysis: {os.path.join(report['out_dir'], 'analysis.json')} and plots/*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
