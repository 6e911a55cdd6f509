#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM (single host or a pod slice). Run from your machine:
#   TPU=my-tpu ZONE=us-central2-b bash launch/tpu_vm.sh --config.model.preset=base --config.data.corpus=gs://...
# Every host runs the same command; bertjax calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES lists
# several hosts, and each process reads only its shard of the corpus. Use a --workdir every host can reach
# (a gs:// bucket) so checkpoints resume after preemption.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-https://github.com/bertjax/bertjax}
WORKDIR=${WORKDIR:-gs://${BUCKET:?set BUCKET or WORKDIR}/bertjax/mlm}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d bertjax ] || git clone $REPO bertjax
  cd bertjax && pip install -q -e '.[tpu]'
  python -m bertjax.main --config=configs/mlm.py --workdir=$WORKDIR --config.mesh.shape.data=-1 $*
"
