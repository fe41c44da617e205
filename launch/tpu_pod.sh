#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every worker (--worker=all). Each
# host runs one process; jax.distributed finds the others from the TPU metadata
# (distributed.mode=on), each process feeds its own rows of every batch, and
# checkpoints go to a bucket all hosts share.
#
#   TPU_NAME=flamingo-v4-256 ZONE=us-central2-b \
#   launch/tpu_pod.sh configs/flamingo_9b.py gs://my-bucket/runs/9b \
#       --config.mesh.tensor=16 --config.mesh.zero1=True
#
# Multi-slice (DCN): add --config.mesh.slice=<number of slices> and launch on
# every slice (e.g. through a queued resource); the slice axis is data-parallel
# over the data-centre network, everything else stays inside a slice.
# A gs:// workdir needs gcsfs on every worker: pip install 'flamingo_jax[gcs]'.
# Preemption: the trainer saves a checkpoint on SIGTERM; rerun this command to resume.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG WORKDIR [--config.a.b=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=$1; WORKDIR=$2; shift 2
REPO_DIR=${REPO_DIR:-\$HOME/flamingo_jax}  # where the code lives on the workers
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

# Quote the trainer's arguments for the remote shell.
ARGS=$(printf ' %q' "$@")
CMD="cd $REPO_DIR && \
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORKDIR/jit_cache} && \
  export LIBTPU_INIT_ARGS='${LIBTPU_INIT_ARGS:---xla_tpu_enable_async_collective_fusion=true}' && \
  python3 -m flamingo_jax.train --config $CONFIG --workdir $WORKDIR \
    --config.distributed.mode=on$ARGS 2>&1 | tee -a /tmp/flamingo_train.log"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="$CMD"
