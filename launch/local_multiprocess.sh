#!/usr/bin/env bash
# Try multi-process training on one CPU machine (2 processes x 4 simulated devices), the way a pod runs it.
#   bash launch/local_multiprocess.sh --config.training.num_train_steps=20
set -euo pipefail
N=2
for i in $(seq 0 $((N - 1))); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i \
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python -m bertjax.main --config=configs/mlm.py --workdir=workdirs/mlm_multiprocess \
    --config.model.preset=tiny "$@" &
done
wait
