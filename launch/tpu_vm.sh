#!/usr/bin/env bash
# One Cloud TPU VM slice: create it (with --create), ship the code, run on every host.
#
#   bash launch/tpu_vm.sh --name=dl-v5e --zone=us-west4-a --accelerator=v5litepod-16 \
#     --version=v2-alpha-tpuv5-lite [--project=P] [--create] [--dry-run] \
#     -- --config=experiments/configs/streaming.py:paper --workdir=/mnt/shared/runs/sd
#
# Every host runs the same command; jax.distributed finds the slice's hosts by itself (Cloud TPU
# detection). The workers share the slice's ICI here: for the slow network between workers use
# launch/tpu_multislice.sh. The workdir must be visible to every host (a shared mount).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
CREATE=0; args=()
for a in "$@"; do if [ "$a" = --create ]; then CREATE=1; else args+=("$a"); fi; done
parse_args "name zone accelerator version" "project=" "${args[@]}"
P=(); [ -n "${OPT[project]}" ] && P=(--project="${OPT[project]}")
if [ $CREATE = 1 ]; then
  run gcloud compute tpus tpu-vm create "${OPT[name]}" --zone="${OPT[zone]}" \
    --accelerator-type="${OPT[accelerator]}" --version="${OPT[version]}" "${P[@]}"
fi
make_archive
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "${OPT[name]}": --worker=all --zone="${OPT[zone]}" "${P[@]}"
run gcloud compute tpus tpu-vm ssh "${OPT[name]}" --worker=all --zone="${OPT[zone]}" "${P[@]}" \
  --command="$UNPACK && $(remote_train_cmd tpu)"
