#!/usr/bin/env bash
# A real multi-process run on this machine: N processes of diloco_jax.main on 127.0.0.1, joined by
# jax.distributed (CPU collectives through gloo), each with its share of the simulated devices.
#
#   bash launch/local.sh N [--dry-run] [--restart[=R]] [--allow_fewer] \
#     --config=experiments/configs/streaming.py:tiny --workdir=DIR
#
# Every other argument goes to every process unchanged (no hyperparameters here). Output lines
# are prefixed [pI]. --restart=R (bare: R=3): when a process fails, the others are stopped (JAX's
# heartbeat does it) and all are started again, up to R times; each attempt resumes from the
# workdir's last checkpoint. --allow_fewer: a restart leaves out the processes that failed first
# or were killed, and the survivors go on with fewer workers (--original_num_processes=N: the
# same workers per process, a checkpoint of more workers resumes with its first ones). A process
# that exits with 2 (bad input) is never restarted. Environment: LOCAL_PORT (default: a free
# port per attempt), LOCAL_HEARTBEAT_S (default 10: a dead process is noticed by the others
# within this many seconds), PYTHON (default .venv/bin/python). Exit status: 0 if every process
# of the last attempt succeeded, else its first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: launch/local.sh N [--dry-run] [diloco_jax.main flags...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
N=$1; shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N (process count) must be a positive integer, got '$N'" >&2; exit 2; }
DRY=0; RESTARTS=0; FEWER=0; ARGS=()
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    --restart) RESTARTS=3 ;;
    --restart=*) RESTARTS=${a#--restart=}
      [[ $RESTARTS =~ ^[0-9]+$ ]] || { echo "local.sh: --restart must be a count of restarts >= 0, got '$RESTARTS'" >&2; exit 2; } ;;
    --allow_fewer) FEWER=1 ;;
    --) ;;
    *) ARGS+=("$a") ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
HB=${LOCAL_HEARTBEAT_S:-10}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${LOCAL_PORT:-$(free_port)}
N0=$N; EXTRA=()   # the first attempt's process count; flags a shrunken restart adds

source launch/lib.sh   # shq
cmd_for() {  # the exact command of process $1, quoted for a shell
  local w out="$PY -u -m diloco_jax.main --coordinator_address=127.0.0.1:$PORT"
  out+=" --num_processes=$N --process_id=$1 --heartbeat_timeout_s=$HB"
  for w in "${EXTRA[@]}" "${ARGS[@]}"; do out+=" $(shq "$w")"; done
  echo "$out"
}
if [ $DRY = 1 ]; then
  for ((i = 0; i < N; i++)); do echo "$(cmd_for $i)"; done
  exit 0
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap 'cleanup; exit 130' INT TERM

describe() {  # exit status -> words
  if [ "$1" -gt 128 ]; then echo "was ended by signal $(( $1 - 128 )) ($(kill -l $(( $1 - 128 )) 2>/dev/null))"
  else echo "exited with status $1"; fi
}

attempt() {  # runs N processes to the end; sets rcs and first_fail ("" when all succeeded)
  pids=(); rcs=(); first_fail=""
  local i rc left=$N fail_time=0
  for ((i = 0; i < N; i++)); do
    "$PY" -u -m diloco_jax.main --coordinator_address=127.0.0.1:"$PORT" --num_processes="$N" \
      --process_id="$i" --heartbeat_timeout_s="$HB" "${EXTRA[@]}" "${ARGS[@]}" \
      > >(sed -u "s/^/[p$i] /") 2>&1 &
    pids+=($!)
    echo "local.sh: process $i pid ${pids[$i]}" >&2
  done
  # A safety net only: the processes end themselves through jax.distributed's heartbeat; if one
  # is still alive long after a failure, it is stopped here and that is said.
  local grace=$(( HB * 3 + 30 ))
  while [ $left -gt 0 ]; do
    for ((i = 0; i < N; i++)); do
      [ -n "${rcs[$i]:-}" ] && continue
      if ! kill -0 "${pids[$i]}" 2>/dev/null; then
        wait "${pids[$i]}"; rc=$?; rcs[$i]=$rc; left=$((left - 1))
        echo "local.sh: process $i $(describe $rc)" >&2
        if [ $rc -ne 0 ] && [ -z "$first_fail" ]; then first_fail=$i; fail_time=$SECONDS; fi
      fi
    done
    if [ -n "$first_fail" ] && [ $left -gt 0 ] && [ $((SECONDS - fail_time)) -gt $grace ]; then
      echo "local.sh: processes still running ${grace}s after process $first_fail failed; stopping them" >&2
      cleanup
    fi
    sleep 0.2
  done
  wait  # the output filters
}

for ((restart = 0; ; restart++)); do
  attempt
  [ -z "$first_fail" ] && exit 0
  rc=${rcs[$first_fail]}
  echo "local.sh: FAILED: process $first_fail $(describe "$rc") first; see its [p$first_fail] lines" >&2
  bad_input=0
  for r in "${rcs[@]}"; do [ "$r" -eq 2 ] && bad_input=1; done
  if [ $bad_input = 1 ]; then
    [ $RESTARTS -gt 0 ] && echo "local.sh: not restarting: a process exited with 2 (bad input)" >&2
    exit "$rc"
  fi
  [ $restart -ge $RESTARTS ] && { [ $RESTARTS -gt 0 ] && echo "local.sh: no restarts left (--restart=$RESTARTS)" >&2; exit "$rc"; }
  if [ $FEWER = 1 ]; then
    # Lost: the process that failed first and any killed outright (SIGKILL: a machine gone);
    # the others only stopped because a peer died.
    lost=1
    for ((i = 0; i < N; i++)); do
      [ "$i" != "$first_fail" ] && [ "${rcs[$i]}" -eq 137 ] && lost=$((lost + 1))
    done
    [ $((N - lost)) -ge 1 ] || { echo "local.sh: no process survived; not restarting" >&2; exit "$rc"; }
    N=$((N - lost)); EXTRA=("--original_num_processes=$N0")
  fi
  [ -z "${LOCAL_PORT:-}" ] && PORT=$(free_port)
  echo "local.sh: restart $((restart + 1)) of $RESTARTS on $N processes, from the last checkpoint" >&2
done
