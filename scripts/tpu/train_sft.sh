#!/usr/bin/env bash
# SFT on a TPU VM (single host; on a multi-host slice run the same command on every host, adding distributed=true:
# the batch is split over every chip of the slice, so batch_size must be a multiple of the chip count).
#   bash scripts/tpu/train_sft.sh [configs/sft_llama7b_lora.yaml] [key=value ...] [--resume]
# Needs: an HF LLaMA-7B folder (set base=/path/to/llama-7b-hf) and the POSI pairs (downloaded from the upstream
# release URL in the config into ~/.cache/posi_jax, or data=/path/to/SFT_toxic_clean.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG="${1:-configs/sft_llama7b_lora.yaml}"
[ $# -gt 0 ] && shift
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e . "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
fi
.venv/bin/python -c 'import jax; print("devices:", jax.devices())'
exec .venv/bin/python -m posi_jax.sft --config "$CONFIG" "$@"
