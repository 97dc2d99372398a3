#!/usr/bin/env bash
# Quick start, command 1: install what is missing, then run the main job on simulated CPU workers.
# Extra arguments are passed to diloco_jax.main (e.g. --config.train.num_steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_venv.sh
exec .venv/bin/python -m diloco_jax.main \
  --config=experiments/configs/streaming.py:tiny --workdir=runs/quickstart "$@"
