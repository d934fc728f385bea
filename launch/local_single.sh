#!/usr/bin/env bash
# One process on this machine (all its devices): the plain path, and the baseline for the multi-process launchers.
#
#   launch/local_single.sh [--config.FIELD=VALUE ...]
#   CONFIG=configs/pretrain.py:demo WORKDIR=/tmp/stmem/demo launch/local_single.sh
#
# Variables: CONFIG (default configs/pretrain.py:tiny), WORKDIR (default /tmp/stmem/local_single),
# PYTHON (default: the active environment's python, see launch/python.sh). Any other arguments are passed on
# (--config.* overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/pretrain.py:tiny}"
WORKDIR="${WORKDIR:-/tmp/stmem/local_single}"
source launch/python.sh
choose_python
# Clear the multi-process variables so that a stray export cannot make this run wait for a coordinator.
unset STMEM_COORDINATOR STMEM_NUM_PROCESSES STMEM_PROCESS_ID
exec "$PYTHON" launch/pretrain.py --config "$CONFIG" --workdir "$WORKDIR" "$@"
