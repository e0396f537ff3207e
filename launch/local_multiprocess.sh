#!/usr/bin/env bash
# N processes of one run on this machine, each with its own CPU devices, joined by
# jax.distributed over localhost (CPU collectives: gloo). For testing the multi-host code path
# without a cluster; see docs/scale_out.md.
#
# Usage:
#   launch/local_multiprocess.sh NUM_PROCESSES [DEVICES_PER_PROCESS] -- [atpo_jax.launch flags...]
# Example:
#   launch/local_multiprocess.sh 2 1 -- --config=configs/search_qa.py --workdir=runs/mp \
#       --config.mesh.data=1 --config.mesh.fsdp=-1
#
# Environment: PYTHON (default: python), PORT (default: a free port), LOG_DIR (default:
# <workdir>/logs or runs/logs): process i writes LOG_DIR/process_<i>.log; process 0 is also
# echoed to the terminal. DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,17p' "$0"
  exit 2
fi
NUM_PROCESSES=$1
shift
DEVICES_PER_PROCESS=1
if [[ $# -gt 0 && "$1" != "--" ]]; then
  DEVICES_PER_PROCESS=$1
  shift
fi
[[ $# -gt 0 && "$1" == "--" ]] && shift

PYTHON=${PYTHON:-python}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
WORKDIR=runs
for arg in "$@"; do
  [[ "$arg" == --workdir=* ]] && WORKDIR=${arg#--workdir=}
done
LOG_DIR=${LOG_DIR:-$WORKDIR/logs}

commands=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  commands+=("env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS \
$PYTHON -m atpo_jax.launch --coordinator_address=127.0.0.1:$PORT --num_processes=$NUM_PROCESSES \
--process_id=$i $(printf '%q ' "$@")")
done
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

cd "$REPO_ROOT"
mkdir -p "$LOG_DIR"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  bash -c "${commands[$i]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $NUM_PROCESSES processes (coordinator 127.0.0.1:$PORT), logs in $LOG_DIR/"
tail -n +1 -f "$LOG_DIR/process_0.log" &
tail_pid=$!
status=0
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if ! wait "${pids[$i]}"; then
    status=1
    echo "process $i failed; see $LOG_DIR/process_$i.log" >&2
    cleanup  # the others would wait for it forever
  fi
done
kill "$tail_pid" 2>/dev/null || true
exit $status
