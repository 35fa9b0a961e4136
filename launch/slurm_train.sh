#!/usr/bin/env bash
# higgs-ds on SLURM: one torchrun per node (srun), rendezvous on the job's first node.
#
#   sbatch --nodes 4 launch/slurm_train.sh RUN.yaml [section.key=value ...] [--dry-run]
#
# Run from the repository root (after ./setup.sh). GPUS_PER_NODE defaults to SLURM's count (or 8).
#SBATCH --job-name=higgs-ds
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=%x-%j.out
set -euo pipefail
USAGE="usage: sbatch [--nodes N] launch/slurm_train.sh RUN.yaml [section.key=value ...] [--dry-run]
Train with higgs-ds on a SLURM allocation: one torchrun per node (srun), rendezvous on the job's first node."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "$USAGE"
    exit 0
fi
if [[ $# -lt 1 ]]; then
    echo "$USAGE" >&2
    exit 2
fi
CONFIG=$1
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
srun --kill-on-bad-exit=1 .venv/bin/torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    launch/train.py --config "$CONFIG" "$@"
