#!/usr/bin/env bash
# PPO on a Cloud TPU VM (single- or multi-host).
#
#   Single host (run on the VM):   scripts/tpu/train_ppo.sh [configs/ppo_llama7b_sd14.yaml] [key=value ...] [--resume]
#   Multi-host (run anywhere with gcloud; same command on every worker, jax.distributed.initialize() joins them):
#       TPU_NAME=my-v4-32 ZONE=us-central2-b scripts/tpu/train_ppo.sh configs/ppo_llama7b_sd14.yaml [...]
#
# Every host holds the whole prompt list and computes the same global batch; parameters are FSDP-sharded over the
# (data, fsdp) mesh of all chips (mesh.fsdp in the config), rollouts and updates run sharded, and only process 0
# writes metrics. Checkpoints (orbax) go to out_dir, which must be shared storage (e.g. a gs:// bucket mounted with
# gcsfuse) on multi-host runs. Setup of the VM (once): scripts/tpu/setup.sh if present, else
#   python3 -m venv .venv && .venv/bin/pip install -e . "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIG="${1:-configs/ppo_llama7b_sd14.yaml}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
CMD="$PY -m posi_jax.ppo --config $CONFIG distributed=true $*"

if [[ -n "${TPU_NAME:-}" ]]; then
  REPO_DIR="${REPO_DIR:-~/posi_jax}"
  exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "${ZONE:?set ZONE}" --worker=all \
    --command "cd $REPO_DIR && $CMD"
fi
exec $CMD
