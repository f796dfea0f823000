#!/usr/bin/env bash
# One cell of a study (launch/study.py submits it): slurm/pretrain.sh trains (or fine-tunes) with
# the cell's variables and flags, checkpointing and requeueing itself on a stop signal; then a
# pretraining run whose final checkpoint is complete is evaluated into OUT_DIR/result.json, the
# record launch/compare.py's tables are made of. A job that requeued itself evaluates nothing.
#
#   OUT_DIR=runs/study/txl/enwik8/smoe/seed1 PRESET=txl-base DATASET=enwik8 \
#       sbatch --nodes 1 --ntasks-per-node 4 --gpus-per-node 4 slurm/study_cell.sh --seed 1 ...
#
# Resources come from sbatch's command line (launch/study.py passes --nodes, --ntasks-per-node,
# --gpus-per-node, --time, --partition, --account); the variables are slurm/pretrain.sh's.
#SBATCH --job-name=s2moe-study
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

REPO=${S2MOE_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export S2MOE_REPO=$REPO PYTHON
: "${OUT_DIR:?set OUT_DIR to the run folder of the cell}"

bash "$REPO/slurm/pretrain.sh" "$@"
rc=$?
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
cd "$REPO"
exec "$PYTHON" -m s2moe_ds.experiments.study finish "$OUT_DIR"
