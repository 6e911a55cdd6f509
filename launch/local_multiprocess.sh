#!/usr/bin/env bash
# Rehearse a multi-host run on one CPU machine: N processes x D simulated devices over jax.distributed, the way a
# pod runs it (one workdir, fsdp over every process).
#   bash launch/local_multiprocess.sh --config.training.num_train_steps=20
#   N=2 D=4 PORT=12355 WORKDIR=workdirs/mlm_multiprocess DRY_RUN=1 bash launch/local_multiprocess.sh   # print only
# Any process failing stops the others; the exit status is the first failure's.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
N=${N:-2}
D=${D:-4}
PORT=${PORT:-12355}
CONFIG=${CONFIG:-configs/mlm.py}
WORKDIR=${WORKDIR:-workdirs/mlm_multiprocess}
PIDS=()
for i in $(seq 0 $((N - 1))); do
  run_bg env JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
    XLA_FLAGS=--xla_force_host_platform_device_count=$D JAX_PLATFORMS=cpu \
    python -m bertjax.main --config="$CONFIG" --workdir="$WORKDIR" --config.model.preset=tiny \
    --config.mesh.shape.data=1 --config.mesh.shape.fsdp=-1 "$@"
  [[ -n "$PID" ]] && PIDS+=("$PID")
done
for _ in "${PIDS[@]}"; do  # as each process ends; the first failure stops the rest
  wait -n && continue
  rc=$?
  kill "${PIDS[@]}" 2>/dev/null || true
  exit "$rc"
done
