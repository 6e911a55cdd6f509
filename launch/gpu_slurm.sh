#!/usr/bin/env bash
# Multi-node GPU pretraining with SLURM: one process per node (srun starts it on every node), all local GPUs each.
#   WORKDIR=gs://my-bucket/bertjax/mlm sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh --config.model.preset=base
#   DRY_RUN=1 WORKDIR=gs://... bash launch/gpu_slurm.sh ...   # print the srun command, run nothing
# jax.distributed.initialize() reads the SLURM environment (--distributed). The workdir must be shared by the nodes:
# a bucket URL, or a shared file system path with SHARED_FS=1. Nodes are one slice each for mesh.dcn_shape.
# Every node needs bertjax installed with `pip install -e '.[gpu]'` (CUDA jax, and gcsfs for gs:// workdirs).
#SBATCH --job-name=bertjax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CONFIG=${CONFIG:-configs/mlm.py}
WORKDIR=${WORKDIR:?set WORKDIR to a gs:// URL or a shared path (with SHARED_FS=1)}
require_shared_workdir "$WORKDIR"
run srun --ntasks-per-node=1 python -m bertjax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed \
  --config.mesh.shape.data=-1 --config.model.dtype=bfloat16 "$@"
