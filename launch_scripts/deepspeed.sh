#!/usr/bin/env bash
# The deepspeed launcher: bash launch_scripts/deepspeed.sh configs/tiny.yaml parallel.zero_stage=3 [overrides...]
# NPROC processes on this node (GPUs, or CPU processes when there is no GPU: megalm then selects DeepSpeed's CPU
# accelerator itself). For several nodes pass a hostfile: HOSTFILE=launch_scripts/hostfile.example.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: deepspeed.sh CONFIG [overrides...]}; shift
HOSTS=()
[ -n "${HOSTFILE:-}" ] && HOSTS=(--hostfile "$HOSTFILE")
exec .venv/bin/deepspeed "${HOSTS[@]}" --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" \
  --module megalm train --config "$CONFIG" "$@"
