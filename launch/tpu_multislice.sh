#!/usr/bin/env bash
# TPU multislice through queued resources: S slices (node count = S), the DiLoCo worker axis over
# the data-centre network between them (mesh.py puts workers on slices).
#
#   bash launch/tpu_multislice.sh --name=dl-ms --zone=us-east5-b --accelerator=v5litepod-16 \
#     --version=v2-alpha-tpuv5-lite --slices=2 [--project=P] [--create] [--dry-run] \
#     -- --config=experiments/configs/streaming.py:paper --workdir=/mnt/shared/runs/sd-ms
#
# Use M = S (one slice per worker) or a multiple/divisor of S. With --create it queues the request
# and returns; run again without --create once `gcloud compute tpus queued-resources describe`
# says ACTIVE. The workdir must be visible to every host (a shared mount).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
CREATE=0; args=()
for a in "$@"; do if [ "$a" = --create ]; then CREATE=1; else args+=("$a"); fi; done
parse_args "name zone accelerator version slices" "project=" "${args[@]}"
[[ ${OPT[slices]} =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '${OPT[slices]}'"
P=(); [ -n "${OPT[project]}" ] && P=(--project="${OPT[project]}")
if [ $CREATE = 1 ]; then
  run gcloud compute tpus queued-resources create "${OPT[name]}" --node-count="${OPT[slices]}" \
    --node-prefix="${OPT[name]}" --accelerator-type="${OPT[accelerator]}" \
    --runtime-version="${OPT[version]}" --zone="${OPT[zone]}" "${P[@]}"
  exit 0
fi
make_archive
run gcloud compute tpus queued-resources scp "$ARCHIVE" "${OPT[name]}": --node=all --worker=all \
  --zone="${OPT[zone]}" "${P[@]}"
run gcloud compute tpus queued-resources ssh "${OPT[name]}" --node=all --worker=all \
  --zone="${OPT[zone]}" "${P[@]}" --command="$UNPACK && $(remote_train_cmd tpu)"
