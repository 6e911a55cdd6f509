#!/usr/bin/env bash
# Pretrain on a Cloud TPU VM: a single host or every host of a pod slice. Run from your machine:
#   TPU=my-tpu ZONE=us-central2-b BUCKET=my-bucket REPO=https://github.com/<you>/bertjax bash launch/tpu_vm.sh \
#     --config.model.preset=base --config.data.corpus=gs://my-bucket/corpus/*.txt
#   DRY_RUN=1 TPU=... ZONE=... BUCKET=... REPO=... bash launch/tpu_vm.sh ...   # print the gcloud command, run nothing
# REPO is the git URL every TPU host clones (your copy of bertjax; REF, a branch or tag, optional); the hosts install
# it with `pip install -e '.[tpu]'`, which brings gcsfs for the gs:// workdir (docs/bucket_storage.md).
# `--worker=all` runs the same command on every host; bertjax calls jax.distributed.initialize() when
# TPU_WORKER_HOSTNAMES lists several hosts. The workdir must be a bucket every host reaches (gs://), so the
# hosts write one checkpoint directory that survives preemption; the same command resumes from it.
# Multi-slice: add --config.mesh.dcn_shape.data=<slices> (or -1) and launch on each slice's VMs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
CONFIG=${CONFIG:-configs/mlm.py}
WORKDIR=${WORKDIR:-gs://${BUCKET:?set BUCKET or WORKDIR}/bertjax/mlm}
require_shared_workdir "$WORKDIR"
: "${REPO:?set REPO to the git URL of the bertjax repository the TPU hosts clone, e.g. REPO=https://github.com/<you>/bertjax}"
CLONE=$(quote git clone ${REF:+--branch "$REF"} "$REPO" bertjax)
TRAIN=$(quote python -m bertjax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")
run gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "set -e; [ -d bertjax ] || $CLONE; cd bertjax && pip install -q -e '.[tpu]' && $TRAIN"
