"""The paper's study (or part of it) on a SLURM cluster: every run one job, their state, the tables.

    python launch/study.py --plan paper --out /scratch/study --seeds 1 2 3 --time 24:00:00   # submit
    python launch/study.py --plan paper --out /scratch/study --seeds 1 2 3 --status          # follow
    python launch/study.py --plan paper --out /scratch/study --seeds 1 2 3 --table           # tables

Flags: --help, or docs/evaluation.md; the library is s2moe_ds/experiments/study.py."""

import sys

from s2moe_ds.cli import pretrain_parser
from s2moe_ds.experiments.study import main

if __name__ == "__main__":
    sys.exit(main(pretrain_parser=pretrain_parser))
