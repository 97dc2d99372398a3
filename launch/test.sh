#!/usr/bin/env bash
# Quick start, command 2: install what is missing, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
exec .venv/bin/python -m pytest "$@"
