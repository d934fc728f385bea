#!/usr/bin/env bash
# N processes on this machine, joined through a coordinator on 127.0.0.1: the multi-host code paths (per-process
# data shards, global batches, collective checkpoints, process-0-only logging) without a cluster.
#
#   launch/local_multiprocess.sh [--config.FIELD=VALUE ...]
#   NUM_PROCESSES=4 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh --config.total_steps=50
#
# Variables:
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1; --xla_force_host_platform_device_count)
#   PLATFORM             JAX_PLATFORMS for the processes (default cpu)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   CONFIG, WORKDIR      as for local_single.sh (default WORKDIR /tmp/stmem/local_multiprocess)
#   HEARTBEAT_TIMEOUT    seconds before a silent process is declared dead and the others stop (default 30)
#   PYTHON               the interpreter (default: the active environment's, see launch/python.sh)
# Each process logs to $WORKDIR/logs/process_<i>.log. Ctrl-C or SIGTERM is passed on to every process (they save a
# checkpoint and stop together, and the script exits 75, preempted: run it again to resume); if any process fails,
# the others are stopped and the script exits with its status.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PLATFORM="${PLATFORM:-cpu}"
CONFIG="${CONFIG:-configs/pretrain.py:tiny}"
WORKDIR="${WORKDIR:-/tmp/stmem/local_multiprocess}"
source launch/python.sh
choose_python
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$WORKDIR/logs"

pids=()
interrupted=0
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'interrupted=1; stop_all' INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  STMEM_COORDINATOR="127.0.0.1:$PORT" STMEM_NUM_PROCESSES="$NUM_PROCESSES" STMEM_PROCESS_ID="$i" \
  STMEM_HEARTBEAT_TIMEOUT="${HEARTBEAT_TIMEOUT:-30}" JAX_PLATFORMS="$PLATFORM" \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
    "$PYTHON" launch/pretrain.py --config "$CONFIG" --workdir "$WORKDIR" "$@" \
    > "$WORKDIR/logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "started $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT); logs in $WORKDIR/logs/" >&2

# As soon as one process fails, stop the rest rather than leave them to the heartbeat timeout.
status=0
preempted=0
while [[ -n "$(jobs -rp)" ]]; do
  code=0
  wait -n || code=$?
  if ((code == 75)); then  # preempted after saving: the others stop at the same step by themselves
    preempted=1
  elif ((code != 0 && status == 0 && !interrupted)); then  # (an interrupted wait returns 128+signal: not a failure)
    echo "a process exited with status $code; stopping the others (see $WORKDIR/logs/)" >&2
    status=$code
    stop_all
  fi
done
trap - INT TERM
if ((status == 0)); then
  sed -n '/^{$/,/^}$/p' "$WORKDIR/logs/process_0.log"   # process 0's summary
  ((preempted)) && status=75
fi
exit "$status"
