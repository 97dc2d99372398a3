#!/usr/bin/env bash
# Quick start, command 2: install what is missing, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
# Two pytest workers, one file each at a time (module fixtures are built once): the suite is
# compile-bound and single-threaded in places, so on 2 cores this takes about 3/4 of the serial
# time. PYTEST_WORKERS=0 runs serially; a later -n in the arguments overrides this one.
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
