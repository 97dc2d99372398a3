#!/usr/bin/env bash
# A SLURM batch job on a GPU cluster: one process per node, the DiLoCo worker axis across nodes
# (mesh.py groups a node's GPUs into one worker, or several workers per node when M > nodes).
#
#   bash launch/slurm.sh --nodes=4 --gpus_per_node=8 [--partition=gpu] [--time=24:00:00] \
#     [--account=A] [--dry-run] -- --config=experiments/configs/streaming.py:paper \
#     --config.diloco.num_workers=4 --config.mesh.data=8 --workdir=/shared/runs/sd-gpu
#
# Run it from a checkout on the cluster's shared filesystem. jax.distributed reads the SLURM
# environment by itself. --dry-run prints the batch script and the sbatch command.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
parse_args "nodes gpus_per_node" "partition= time=24:00:00 account=" "$@"
for k in nodes gpus_per_node; do
  [[ ${OPT[$k]} =~ ^[1-9][0-9]*$ ]] || die "--$k must be a positive integer, got '${OPT[$k]}'"
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
script() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=diloco_jax"
  echo "#SBATCH --nodes=${OPT[nodes]}"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=${OPT[gpus_per_node]}"
  echo "#SBATCH --time=${OPT[time]}"
  [ -n "${OPT[partition]}" ] && echo "#SBATCH --partition=${OPT[partition]}"
  [ -n "${OPT[account]}" ] && echo "#SBATCH --account=${OPT[account]}"
  echo "set -euo pipefail"
  echo "cd $(shq "$REPO")"
  echo "JAX_EXTRA=cuda12 bash launch/setup_venv.sh   # once, on the shared filesystem"
  printf 'srun .venv/bin/python -m diloco_jax.main'
  local f; for f in "${MAIN_FLAGS[@]}"; do printf ' %s' "$(shq "$f")"; done; echo
}
BATCH=${REPO}/launch/.slurm-$(date +%Y%m%d-%H%M%S).sbatch
if [ $DRY_RUN = 1 ]; then
  script; echo "sbatch $BATCH"
else
  script > "$BATCH"; sbatch "$BATCH"
fi
