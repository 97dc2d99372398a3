#!/usr/bin/env bash
# Data-parallel vs DiLoCo vs Streaming DiLoCo (and its ablations) on the tiny CPU setting: same
# model (4 blocks), data, M=4 workers, T=300 steps. Prints one line per run: final eval loss,
# gap to the entropy floor, bits sent per worker and the ratio to data-parallel's bits.
# Usage: bash experiments/compare_tiny.sh [OUTDIR]   (about 6 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/compare_tiny}
py=.venv/bin/python
sd=experiments/configs/streaming.py:tiny
common=(--config.model.num_layers=4 --config.diloco.inner_steps=30)
run() {
  local name=$1; shift
  rm -rf "$out/$name"
  "$py" -m diloco_jax.main --workdir="$out/$name" "$@" >/dev/null 2>"$out/$name.log" || {
    cat "$out/$name.log"; exit 1; }
}
mkdir -p "$out"
run dp --config=experiments/configs/diloco.py:tiny --config.algorithm=dp "${common[@]}"
run diloco --config=experiments/configs/diloco.py:tiny "${common[@]}"
run streaming --config=$sd
run streaming_tau0 --config=$sd --config.diloco.overlap_steps=0
run streaming_alpha0 --config=$sd --config.diloco.merge_alpha=0.0
run streaming_fp32 --config=$sd --config.diloco.codec=fp32
run streaming_tau5 --config=$sd --config.diloco.overlap_steps=5
"$py" - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for name in ("dp", "diloco", "streaming", "streaming_tau0", "streaming_alpha0", "streaming_fp32",
             "streaming_tau5"):
  with open(os.path.join(out, name, "summary.json")) as f:
    rows.append((name, json.load(f)))
print(f"{'run':18s} {'eval loss':>9s} {'gap':>7s} {'bits/worker':>12s} {'peak bits/step':>14s} {'DP bits / bits':>14s}")
for name, s in rows:
  ratio = s["dp_bits_sent_per_worker"] / s["bits_sent_per_worker"]
  print(f"{name:18s} {s['final_eval_loss']:9.4f} {s['gap_to_floor']:7.4f} "
        f"{s['bits_sent_per_worker']:12.4g} {s['peak_bits_per_step']:14.4g} {ratio:14.1f}")
PY
