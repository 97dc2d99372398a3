#!/usr/bin/env bash
# GKE through XPK (which builds an image from this directory and submits a JobSet): S TPU slices,
# the worker axis over the network between them.
#
#   bash launch/gke_xpk.sh --cluster=my-cluster --workload=sd-1b --tpu_type=v5litepod-256 \
#     --slices=2 [--project=P] [--zone=Z] [--dry-run] \
#     -- --config=experiments/configs/streaming.py:paper --workdir=/mnt/shared/runs/sd-1b
#
# jax.distributed finds the JobSet's pods by itself. Needs `pip install xpk` and a cluster made
# with `xpk cluster create` for the same TPU type and slice count.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
parse_args "cluster workload tpu_type slices" "project= zone=" "$@"
[[ ${OPT[slices]} =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '${OPT[slices]}'"
X=(); [ -n "${OPT[project]}" ] && X+=(--project="${OPT[project]}")
[ -n "${OPT[zone]}" ] && X+=(--zone="${OPT[zone]}")
cmd=$(remote_train_cmd tpu); cmd=${cmd#cd diloco_jax && }   # the image's workdir is the repo
run xpk workload create --cluster="${OPT[cluster]}" --workload="${OPT[workload]}" \
  --tpu-type="${OPT[tpu_type]}" --num-slices="${OPT[slices]}" --base-docker-image=python:3.11 \
  --script-dir="$(cd "$(dirname "$0")/.." && pwd)" "${X[@]}" --command="$cmd"
