#!/usr/bin/env bash
# Pretrain with launch/pretrain.py on a SLURM allocation: one process per GPU, started by srun.
#
#   sbatch --gpus-per-node 8 slurm/pretrain.sh                 # 1 node x 8 tasks, the defaults below
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 slurm/pretrain.sh --max-steps 100000
#   DATASET=enwik8 OUT_DIR=/scratch/runs/e8 sbatch --gpus-per-node 8 slurm/pretrain.sh --max-steps 100000
#
#   SCRIPT=launch/finetune.py PRETRAINED=runs/tiny DATASET=sst2 sbatch --gpus-per-node 8 slurm/pretrain.sh
#
# Arguments after the script name go to the launch script unchanged (they win over the variables).
# SCRIPT (launch/pretrain.py) may be launch/finetune.py: the same requeue, signals and resume,
# with PRETRAINED (the checkpoint to fine-tune) and DS_CONFIG defaulting to ds_configs/finetune.json.
# Environment overrides: PRESET (paper-small: 16 experts, so EP_SIZE 8 divides them), DS_CONFIG (ds_configs/zero2.json), DATASET (embedded),
# DATA_PATH, EP_SIZE (tasks per node: keeps the all-to-all inside a node), OUT_DIR
# (runs/<job name>-<job id>), PYTHON (.venv/bin/python when present), MAX_REQUEUES (10),
# MASTER_PORT (derived from the job id).
#
# Time limits and preemption: SLURM sends SIGUSR1 to every task 5 minutes before the time limit
# (--signal) and SIGTERM on preemption; the tasks finish their step, checkpoint and exit with 75,
# and this script requeues the job, which resumes from that checkpoint (same job id, same OUT_DIR).
# Any other failure ends the job; requeues stop after MAX_REQUEUES.
#SBATCH --job-name=s2moe-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

EXIT_REQUEUE=75  # the launch scripts' status after checkpointing on a stop signal
REPO=${S2MOE_REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
NTASKS=${SLURM_NTASKS:?run this script with sbatch (or inside salloc)}
TASKS_PER_NODE=$(( NTASKS / SLURM_JOB_NUM_NODES ))
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
# One port per job, so jobs sharing a node do not collide; the same after a requeue.
export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
OUT_DIR=${OUT_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
RESTART=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$OUT_DIR/logs
mkdir -p "$LOG_DIR"

SCRIPT=${SCRIPT:-launch/pretrain.py}
ARGS=(--ep-size "${EP_SIZE:-$TASKS_PER_NODE}" --out-dir "$OUT_DIR" --expect-world-size "$NTASKS" --resume)
if [ "$SCRIPT" = launch/finetune.py ]; then
    ARGS+=(--deepspeed_config "${DS_CONFIG:-ds_configs/finetune.json}" --pretrained "${PRETRAINED:?set PRETRAINED to the checkpoint to fine-tune}")
    if [ -n "${DATASET:-}" ]; then ARGS+=(--dataset "$DATASET"); fi
else
    ARGS+=(--deepspeed_config "${DS_CONFIG:-ds_configs/zero2.json}" --preset "${PRESET:-paper-small}"
           --dataset "${DATASET:-embedded}")
fi
if [ -n "${DATA_PATH:-}" ]; then ARGS+=(--path "$DATA_PATH"); fi

echo "job $SLURM_JOB_ID restart $RESTART: $NTASKS tasks on $SLURM_JOB_NUM_NODES node(s) ($SLURM_JOB_NODELIST), rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "logs:        $LOG_DIR"
echo "tensorboard: tensorboard --logdir $OUT_DIR/tensorboard"
echo "checkpoints: $OUT_DIR/checkpoints"

# A GPU hang leaves a trace: an NCCL error or timeout aborts the communicator and ends the task
# (instead of waiting), and PyTorch's flight recorder writes each rank's last collectives to
# $LOG_DIR/nccl_trace_rank_<r> on a timeout. (The run's own watchdog, --hang-timeout-s, names the
# ranks that stopped responding.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$LOG_DIR/nccl_trace_rank_}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$TORCH_FR_DUMP_TEMP_FILE}

set +e
# Each task learns its rank from SLURM; exec hands the signals straight to Python.
srun --kill-on-bad-exit=1 --output "$LOG_DIR/job${SLURM_JOB_ID}-restart${RESTART}-rank%t.log" \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
             export LOCAL_WORLD_SIZE=$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES )); exec "$@"' \
    s2moe "$PYTHON" "$SCRIPT" "${ARGS[@]}" "$@"
rc=$?
set -e

# The launch script leaves OUT_DIR/REQUEUE after checkpointing on a stop signal (and exits with
# 75); the marker is what counts, since srun's status can change when it kills the last tasks.
if [ -f "$OUT_DIR/REQUEUE" ]; then
    reason=$(cat "$OUT_DIR/REQUEUE")
    rm -f "$OUT_DIR/REQUEUE"
    if [ "$RESTART" -lt "${MAX_REQUEUES:-10}" ]; then
        echo "$reason, checkpointed: requeueing job $SLURM_JOB_ID (restart $(( RESTART + 1 )))"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$reason, but the job was already requeued $RESTART times (MAX_REQUEUES); not again" >&2
    exit "$EXIT_REQUEUE"
fi
echo "training exited with status $rc"
exit "$rc"
