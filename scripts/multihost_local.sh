#!/usr/bin/env bash
# A pod's multi-host code path on one machine: N local processes joined by jax.distributed over loopback, each with
# DEVICES_PER_PROCESS fake CPU devices and gloo CPU collectives.
#
#   scripts/multihost_local.sh N CMD [ARGS...]
#   scripts/multihost_local.sh 2 python -m posi_jax.sft --config configs/sft_smollm2_135m.yaml distributed=true
#
# Every process runs the same CMD with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port), JAX_NUM_PROCESSES=N,
# JAX_PROCESS_ID=i (read by posi_jax.training.distributed.initialize), JAX_PLATFORMS=cpu,
# JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo and XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS
# (default 4). Output lines are prefixed with the process id. The script waits for all of them; as soon as one exits
# non-zero the others are killed and the script exits with that status (0 when every process succeeded).
set -uo pipefail
if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CMD [ARGS...]   (N processes, DEVICES_PER_PROCESS fake CPU devices each, default 4)" >&2
  exit 2
fi
N="$1"
shift
PYTHON_FOR_PORT="${PYTHON:-python3}"
PORT="${MULTIHOST_PORT:-$("$PYTHON_FOR_PORT" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < N; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4} ${XLA_FLAGS:-}"
    exec "$@"
  ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=("$!")
done

status=0
remaining=$N
while ((remaining > 0)); do
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  [[ -z "${done_pid:-}" ]] && break
  remaining=$((remaining - 1))
  for k in "${!pids[@]}"; do [[ "${pids[$k]}" == "$done_pid" ]] && unset 'pids[k]'; done
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "multihost_local: a process (pid $done_pid) exited with status $rc; stopping the others" >&2
    cleanup
  fi
done
wait
exit "$status"
