#!/usr/bin/env bash
# A SLURM batch job on a GPU cluster: one process per node, the DiLoCo worker axis across nodes
# (mesh.py groups a node's GPUs into one worker, or several workers per node when M > nodes).
#
#   bash launch/slurm.sh --nodes=4 --gpus_per_node=8 [--partition=gpu] [--time=24:00:00] \
#     [--account=A] [--dry-run] -- --config=experiments/configs/streaming.py:paper \
#     --config.diloco.num_workers=4 --config.mesh.data=8 --workdir=/shared/runs/sd-gpu
#
# --restart=R: the batch script runs srun again (up to R times) when it fails with anything but
# 2 (bad input); each run resumes from the workdir's last checkpoint. --allow_fewer=1 (with
# --restart): the job survives a node failure (#SBATCH --no-kill) and the next srun runs on the
# nodes still up, with --original_num_processes (the same workers per node, so fewer workers).
#
# Run it from a checkout on the cluster's shared filesystem. jax.distributed reads the SLURM
# environment by itself. --dry-run prints the batch script and the sbatch command.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
parse_args "nodes gpus_per_node" "partition= time=24:00:00 account= restart=0 allow_fewer=0" "$@"
[[ ${OPT[restart]} =~ ^[0-9]+$ ]] || die "--restart must be a count of restarts >= 0, got '${OPT[restart]}'"
[[ ${OPT[allow_fewer]} =~ ^[01]$ ]] || die "--allow_fewer must be 0 or 1, got '${OPT[allow_fewer]}'"
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
  [ "${OPT[allow_fewer]}" = 1 ] && echo "#SBATCH --no-kill"
  echo "set -euo pipefail"
  echo "cd $(shq "$REPO")"
  echo "JAX_EXTRA=cuda12 bash launch/setup_venv.sh   # once, on the shared filesystem"
  local f cmd='.venv/bin/python -m diloco_jax.main'
  for f in "${MAIN_FLAGS[@]}"; do cmd+=" $(shq "$f")"; done
  if [ "${OPT[restart]}" = 0 ]; then echo "srun $cmd"; return; fi
  echo "NODES=${OPT[nodes]}; EXTRA=''"
  echo "for attempt in \$(seq 0 ${OPT[restart]}); do"
  echo "  [ \$attempt -gt 0 ] && echo \"restart \$attempt of ${OPT[restart]} on \$NODES nodes, from the last checkpoint\""
  echo "  rc=0; srun --nodes=\$NODES --ntasks=\$NODES $cmd \$EXTRA || rc=\$?"
  echo "  [ \$rc -eq 0 ] && exit 0"
  echo "  [ \$rc -eq 2 ] && exit 2   # bad input: the same again would fail the same way"
  if [ "${OPT[allow_fewer]}" = 1 ]; then
    echo "  # the allocation's nodes still up (a failed node is down or drained)"
    echo "  NODES=\$(sinfo -h -n \"\$SLURM_JOB_NODELIST\" -t allocated,mixed,idle -o %n | sort -u | wc -l)"
    echo "  [ \$NODES -ge 1 ] || exit \$rc"
    echo "  EXTRA=--original_num_processes=${OPT[nodes]}"
  fi
  echo "done"
  echo "exit \$rc"
}
BATCH=${REPO}/launch/.slurm-$(date +%Y%m%d-%H%M%S).sbatch
if [ $DRY_RUN = 1 ]; then
  script; echo "sbatch $BATCH"
else
  script > "$BATCH"; sbatch "$BATCH"
fi
