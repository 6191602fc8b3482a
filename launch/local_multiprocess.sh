#!/usr/bin/env bash
# Runs N pathjax processes on this machine as one multi-host job (gloo collectives over
# loopback), each with DEVICES fake CPU devices. Use it to test multi-host code paths.
#
#   launch/local_multiprocess.sh 2 pathjax train --config=configs/mrplip.py:smoke --workdir /tmp/w
#   DEVICES=2 launch/local_multiprocess.sh 2 python -m pathjax train ...
#
# Output of process i goes to LOGS/proc_i.log and process 0 is echoed. LOGS is a new private
# folder (mktemp -d, mode 0700) made inside ${LOGDIR}, else inside the command's --workdir
# (WORKDIR/logs/), else inside ${TMPDIR:-/tmp}: never a fixed name that a symlink could
# redirect, and reruns never overwrite earlier logs.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: [DEVICES=n] [PORT=p] [LOGDIR=dir] $0 NUM_PROCESSES COMMAND..." >&2
  exit 2
fi
num=$1; shift
devices=${DEVICES:-1}
port=${PORT:-$((20000 + RANDOM % 20000))}

workdir=""
args=("$@")
for ((j = 0; j < ${#args[@]}; j++)); do
  case "${args[$j]}" in
    --workdir) workdir=${args[$((j + 1))]:-} ;;
    --workdir=*) workdir=${args[$j]#--workdir=} ;;
  esac
done
if [[ -n "${LOGDIR:-}" ]]; then
  logroot=$LOGDIR
elif [[ -n "$workdir" ]]; then
  logroot=$workdir/logs
else
  logroot=${TMPDIR:-/tmp}
fi
mkdir -p -- "$logroot"
logdir=$(mktemp -d "$logroot/pathjax-launch.$(date -u +%Y%m%dT%H%M%S).XXXXXX")
echo "logs: $logdir" >&2

# Fake CPU devices: XLA's concurrency-optimised CPU scheduler may order collectives differently
# per device, and their threads then wait for each other forever; the plain one keeps order.
pids=()
for ((i = 0; i < num; i++)); do
  PATHJAX_COORDINATOR=127.0.0.1:$port PATHJAX_NUM_PROCESSES=$num PATHJAX_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices --xla_cpu_enable_concurrency_optimized_scheduler=false" \
    "$@" >"$logdir/proc_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=$?; echo "process $i failed (exit $status); log: $logdir/proc_$i.log" >&2; }
done
cat "$logdir/proc_0.log"
exit $status
