#!/usr/bin/env bash
# Multi-node GPU pretraining with SLURM: one process per node, all local GPUs per process.
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh --config.model.preset=base
# jax.distributed.initialize() reads the SLURM environment (SLURM_NTASKS > 1 turns it on).
#SBATCH --job-name=bertjax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
WORKDIR=${WORKDIR:-$PWD/workdirs/mlm}
srun python -m bertjax.main --config=configs/mlm.py --workdir="$WORKDIR" --distributed \
  --config.mesh.shape.data=-1 --config.model.dtype=bfloat16 "$@"
