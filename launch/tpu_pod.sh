#!/usr/bin/env bash
# Runs a pathjax command on every worker of a TPU VM pod (v4, v5e, v5p; multi-slice too).
# JAX finds the pod's coordinator and process ids itself (PATHJAX_DISTRIBUTED=auto).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh \
#     pathjax train --config=configs/mrplip.py:vitl16 --workdir gs://bucket/runs/mrplip
#
# Set up once per pod: SETUP=1 installs pathjax from REPO_URL (default: this checkout's
# origin) on every worker. The workdir must be shared storage (GCS) so every host sees the
# same checkpoints; records directories likewise.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"; : "${ZONE:?set ZONE}"
project_flag=${PROJECT:+--project=$PROJECT}
repo_url=${REPO_URL:-$(git config --get remote.origin.url || true)}
if [[ "${SETUP:-0}" == 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $project_flag --worker=all --command \
    "git clone $repo_url pathjax || (cd pathjax && git pull) ; cd pathjax && python3 -m venv .venv && \
     .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."
fi
cmd=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $project_flag --worker=all --command \
  "cd pathjax && PATHJAX_DISTRIBUTED=auto .venv/bin/$cmd"
