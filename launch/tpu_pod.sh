#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU pod slice (one process per host).
# jax.distributed finds the coordinator, the process count and each rank from the TPU metadata
# (--distributed=on), so the command is the same on every worker; see docs/scale_out.md.
#
# Usage:
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a [PROJECT=my-project] launch/tpu_pod.sh [atpo_jax.launch flags...]
# Example:
#   TPU_NAME=atpo ZONE=us-central2-b launch/tpu_pod.sh --config=configs/search_qa.py:qwen3_4b \
#       --workdir=/mnt/shared/runs/atpo --config.model.path=/mnt/shared/Qwen3-4B \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
#
# Environment:
#   TPU_NAME, ZONE (required), PROJECT (default: gcloud's), REMOTE_DIR (the checkout on every
#   worker, default: ~/atpo_jax), PYTHON (on the workers, default: python3), SETUP=1 to first
#   `git pull` and `pip install -e .` on every worker, DRY_RUN=1 to print the gcloud command.
# The workdir must be a directory every worker sees (an NFS/Filestore mount, or a GCS bucket
# mounted with gcsfuse): orbax writes each host's shards into the same checkpoint directory,
# and process 0 writes the metrics there.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REMOTE_DIR=${REMOTE_DIR:-'~/atpo_jax'}
PYTHON=${PYTHON:-python3}

remote="cd $REMOTE_DIR"
if [[ "${SETUP:-0}" == 1 ]]; then
  remote+=" && git pull --ff-only && $PYTHON -m pip install -q -e ."
fi
remote+=" && $PYTHON -m atpo_jax.launch --distributed=on $(printf '%q ' "$@")"

cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$remote")
[[ -n "${PROJECT:-}" ]] && cmd+=(--project="$PROJECT")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
