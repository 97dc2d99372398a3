#!/usr/bin/env bash
# Creates ./.venv with the pinned dependencies if it is missing or stale. Idempotent and quiet.
# JAX_EXTRA=tpu or cuda12 adds the accelerator build of the pinned jax (the launchers set it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${JAX_EXTRA:-}
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)${EXTRA:+-$EXTRA}
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  echo "setting up .venv (first run only, about a minute)" >&2
  # pip's local-index warnings on some machines are noise; real errors still fail the script.
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
  .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
  if [ -n "$EXTRA" ]; then
    jax_version=$(sed -n 's/^ *"jax==\([^"]*\)",*/\1/p' pyproject.toml)
    .venv/bin/python -m pip install -q "jax[$EXTRA]==$jax_version" 2>&1 | { grep -v '^WARNING: Location' || true; } >&2
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
