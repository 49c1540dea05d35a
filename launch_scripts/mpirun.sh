#!/usr/bin/env bash
# OpenMPI: bash launch_scripts/mpirun.sh configs/tiny.yaml parallel.tp=2 [overrides...]
# megalm reads OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK; MASTER_ADDR must name the host of rank 0.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: mpirun.sh CONFIG [overrides...]}; shift
if ! command -v mpirun >/dev/null 2>&1; then
  echo "mpirun.sh: mpirun not found; it needs OpenMPI (Debian/Ubuntu: apt-get install openmpi-bin)" >&2
  exit 2
fi
ROOT=()
[ "$(id -u)" = 0 ] && ROOT=(--allow-run-as-root)
exec mpirun "${ROOT[@]}" --oversubscribe -np "${NPROC:-2}" ${HOSTFILE:+--hostfile "$HOSTFILE"} \
  --mca btl self,tcp -x MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" -x MASTER_PORT="${MASTER_PORT:-29500}" \
  -x PATH -x PYTHONPATH .venv/bin/python -m megalm train --config "$CONFIG" "$@"
