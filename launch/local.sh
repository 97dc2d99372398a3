#!/usr/bin/env bash
# A real multi-process run on this machine: N processes of diloco_jax.main on 127.0.0.1, joined by
# jax.distributed (CPU collectives through gloo), each with its share of the simulated devices.
#
#   bash launch/local.sh N [--dry-run] --config=experiments/configs/streaming.py:tiny --workdir=DIR
#
# Every other argument goes to every process unchanged (no hyperparameters here). Output lines
# are prefixed [pI]. Environment: LOCAL_PORT (default: a free port), LOCAL_HEARTBEAT_S (default
# 10: a dead process is noticed by the others within this many seconds), PYTHON (default
# .venv/bin/python). Exit status: 0 if every process succeeded, else the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: launch/local.sh N [--dry-run] [diloco_jax.main flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
N=$1; shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N (process count) must be a positive integer, got '$N'" >&2; exit 2; }
DRY=0; ARGS=()
for a in "$@"; do
  case $a in --dry-run) DRY=1 ;; --) ;; *) ARGS+=("$a") ;; esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
HB=${LOCAL_HEARTBEAT_S:-10}
PORT=${LOCAL_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

source launch/lib.sh   # shq
cmd_for() {  # the exact command of process $1, quoted for a shell
  local w out="$PY -u -m diloco_jax.main --coordinator_address=127.0.0.1:$PORT"
  out+=" --num_processes=$N --process_id=$1 --heartbeat_timeout_s=$HB"
  for w in "${ARGS[@]}"; do out+=" $(shq "$w")"; done
  echo "$out"
}
if [ $DRY = 1 ]; then
  for ((i = 0; i < N; i++)); do echo "$(cmd_for $i)"; done
  exit 0
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'cleanup; exit 130' INT TERM
for ((i = 0; i < N; i++)); do
  "$PY" -u -m diloco_jax.main --coordinator_address=127.0.0.1:"$PORT" --num_processes="$N" \
    --process_id="$i" --heartbeat_timeout_s="$HB" "${ARGS[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
  echo "local.sh: process $i pid ${pids[$i]}" >&2
done

describe() {  # exit status -> words
  if [ "$1" -gt 128 ]; then echo "was ended by signal $(( $1 - 128 )) ($(kill -l $(( $1 - 128 )) 2>/dev/null))"
  else echo "exited with status $1"; fi
}
rcs=(); left=$N; first_fail=""; fail_time=0
# A safety net only: the processes end themselves through jax.distributed's heartbeat; if one is
# still alive long after a failure, it is stopped here and that is said.
GRACE=$(( HB * 3 + 30 ))
while [ $left -gt 0 ]; do
  for ((i = 0; i < N; i++)); do
    [ -n "${rcs[$i]:-}" ] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"; rc=$?; rcs[$i]=$rc; left=$((left - 1))
      echo "local.sh: process $i $(describe $rc)" >&2
      if [ $rc -ne 0 ] && [ -z "$first_fail" ]; then first_fail=$i; fail_time=$SECONDS; fi
    fi
  done
  if [ -n "$first_fail" ] && [ $left -gt 0 ] && [ $((SECONDS - fail_time)) -gt $GRACE ]; then
    echo "local.sh: processes still running ${GRACE}s after process $first_fail failed; stopping them" >&2
    cleanup
  fi
  sleep 0.2
done
wait  # the output filters
if [ -n "$first_fail" ]; then
  echo "local.sh: FAILED: process $first_fail $(describe "${rcs[$first_fail]}") first; see its [p$first_fail] lines" >&2
  exit "${rcs[$first_fail]}"
fi
exit 0
