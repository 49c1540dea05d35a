#!/usr/bin/env bash
# One node, NPROC processes: bash launch_scripts/torchrun.sh configs/tiny.yaml parallel.tp=2 [overrides...]
# Several nodes: set NNODES, NODE_RANK and MASTER_ADDR on each (or use launch_scripts/slurm/torchrun.sbatch).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: torchrun.sh CONFIG [overrides...]}; shift
exec .venv/bin/torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-2}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m megalm train --config "$CONFIG" "$@"
