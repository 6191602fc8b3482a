#!/usr/bin/env bash
# Runs N pathjax processes on this machine as one multi-host job (gloo collectives over
# loopback), each with DEVICES fake CPU devices. Use it to test multi-host code paths.
#
#   launch/local_multiprocess.sh 2 pathjax train --config=configs/mrplip.py:smoke --workdir /tmp/w
#   DEVICES=2 launch/local_multiprocess.sh 2 python -m pathjax train ...
#
# Output of process i goes to ${LOGDIR:-/tmp}/pathjax_proc_i.log and process 0 is echoed.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: [DEVICES=n] [PORT=p] $0 NUM_PROCESSES COMMAND..." >&2
  exit 2
fi
num=$1; shift
devices=${DEVICES:-1}
port=${PORT:-$((20000 + RANDOM % 20000))}
logdir=${LOGDIR:-/tmp}
pids=()
for ((i = 0; i < num; i++)); do
  PATHJAX_COORDINATOR=127.0.0.1:$port PATHJAX_NUM_PROCESSES=$num PATHJAX_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
    "$@" >"$logdir/pathjax_proc_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=$?; echo "process $i failed (exit $status); log: $logdir/pathjax_proc_$i.log" >&2; }
done
cat "$logdir/pathjax_proc_0.log"
exit $status
