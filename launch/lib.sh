# Shared by the cloud launchers (sourced, not run). Each launcher takes --key=value options for
# infrastructure only, then `--` and the diloco_jax.main flags, which it passes on unchanged.
# With --dry-run it prints every command it would run, exactly, and runs none.

DRY_RUN=0
MAIN_FLAGS=()
declare -A OPT

die() { echo "$(basename "$0"): $*" >&2; exit 2; }

# parse_args "required keys" "optional key=default ..." -- "$@"
parse_args() {
  local required=$1 optional=$2; shift 2
  local kv
  for kv in $optional; do OPT[${kv%%=*}]=${kv#*=}; done
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --) shift; MAIN_FLAGS=("$@"); break ;;
      --*=*) local k=${1%%=*}; k=${k#--}; OPT[$k]=${1#*=}
             [[ " $required $(for kv in $optional; do echo -n "${kv%%=*} "; done)" == *" $k "* ]] \
               || die "unknown option --$k (allowed: $required $(for kv in $optional; do echo -n "${kv%%=*} "; done)--dry-run)" ;;
      *) die "expected --key=value options, then -- and the diloco_jax.main flags; got '$1'" ;;
    esac
    shift
  done
  for k in $required; do [ -n "${OPT[$k]:-}" ] || die "--$k is required"; done
  [ ${#MAIN_FLAGS[@]} -gt 0 ] || die "give the training flags after --, e.g. -- --config=experiments/configs/streaming.py:paper --workdir=/shared/runs/x"
  local f has_config=0
  for f in "${MAIN_FLAGS[@]}"; do [[ $f == --config=* ]] && has_config=1; done
  [ $has_config = 1 ] || die "the flags after -- must include --config=FILE[:ARG]"
}

# shq WORD: the word as a POSIX shell would need it (single quotes only where needed).
shq() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# run CMD ARGS...: prints the command (each word quoted as needed) with --dry-run, else runs it.
run() {
  if [ $DRY_RUN = 1 ]; then
    local w out=""
    for w in "$@"; do out+="$(shq "$w") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

# The training command every host runs, as one shell string (for ssh --command / srun / xpk).
remote_train_cmd() {
  local extra=$1
  printf 'cd diloco_jax && JAX_EXTRA=%s bash launch/setup_venv.sh && .venv/bin/python -m diloco_jax.main' "$extra"
  local f
  for f in "${MAIN_FLAGS[@]}"; do printf ' %s' "$(shq "$f")"; done
}

# A tarball of the committed tree (what every host runs; uncommitted edits are not shipped).
ARCHIVE=${TMPDIR:-/tmp}/diloco_jax-$(git -C "$(dirname "${BASH_SOURCE[0]}")/.." rev-parse --short HEAD 2>/dev/null || echo src).tar.gz
make_archive() {
  run git -C "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" archive --format=tar.gz -o "$ARCHIVE" HEAD
}
UNPACK="mkdir -p diloco_jax && tar xzf $(basename "$ARCHIVE") -C diloco_jax"
