"""Load: many simulated workers on this CPU (issue 13), through the public command line.

Each run is one `python -m diloco_jax.main` process (Streaming DiLoCo, the tiny model, M workers
sharing --devices simulated devices), so its peak memory is its own: the resident set size the
kernel reports for that child (os.wait4). After the run, every array of the final checkpoint is
read back and checked finite, and each worker's parameter norm is printed as min / max over
the workers. The fault-injection runs repeat M=16 with outer gradients dropped and one outage.

  .venv/bin/python experiments/load.py                       # M = 16, 64, then the faults at 16
  .venv/bin/python experiments/load.py --workers=16 --steps=100 --faults=false

Tokens/s is the trainer's own (summary.json: tokens over the wall time of the steps, compiling
excluded). Not a test: it takes minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKERS = flags.DEFINE_list("workers", ["16", "64"], "worker counts M to run")
_STEPS = flags.DEFINE_integer("steps", 200, "inner steps T of each run")
_DEVICES = flags.DEFINE_integer("devices", 8, "simulated CPU devices the workers share")
_FAULTS = flags.DEFINE_bool("faults", True, "also run M=16 with drops and an outage")
_OUT = flags.DEFINE_string("out", "", "where the workdirs go (default: a temporary directory)")


def run_one(name: str, workers: int, steps: int, devices: int, out: str, extra=()) -> dict:
  """Trains one run in a child process; returns its summary, peak RSS and finiteness."""
  workdir = os.path.join(out, name)
  argv = [sys.executable, "-m", "diloco_jax.main",
          "--config=experiments/configs/streaming.py:tiny", f"--workdir={workdir}",
          f"--config.diloco.num_workers={workers}", f"--config.train.num_steps={steps}",
          f"--config.mesh.num_cpu_devices={devices}", "--config.eval.every_steps=0",
          f"--config.train.log_every={max(steps // 4, 1)}", "--config.checkpoint.every_steps=0",
          *extra]
  t0 = time.perf_counter()
  proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  log = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"load: run {name} failed with status {proc.returncode}:\n{log[-3000:]}")
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  finite, norms = _check_state(workdir, steps)
  return dict(name=name, M=workers, steps=steps, tokens_per_s=summary["tokens_per_s"],
              peak_rss_gib=usage.ru_maxrss / 2**20, wall_s=wall,
              final_eval_loss=summary["final_eval_loss"], all_finite=finite, norms=norms)


def _check_state(workdir: str, step: int):
  """(every array of the final checkpoint finite, (min, max) over workers of ‖θ_m‖)."""
  code = f"""
import json, numpy as np, jax
from diloco_jax import checkpoint
c = checkpoint.Checkpointer({os.path.join(workdir, "checkpoints")!r})
state, _ = c.restore_saved({step})
finite = all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
sq = sum(np.square(np.asarray(x, np.float64)).reshape(np.shape(x)[0], -1).sum(1)
         for x in jax.tree.leaves(state["local_params"]))
print(json.dumps([finite, float(np.sqrt(sq).min()), float(np.sqrt(sq).max())]))
c.close()
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
  finite, lo, hi = json.loads(out.stdout.strip().splitlines()[-1])
  return finite, (lo, hi)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    counts = [int(m) for m in _WORKERS.value]
  except ValueError:
    print(f"load: --workers must be integers, got {_WORKERS.value}", file=sys.stderr)
    return 2
  out = _OUT.value or tempfile.mkdtemp(prefix="diloco_jax_load_")
  T, D = _STEPS.value, _DEVICES.value
  plan = [(f"M{m}", m, ()) for m in counts]
  if _FAULTS.value:
    plan += [("M16_drop0.5", 16, ("--config.diloco.drop_prob=0.5",)),
             ("M16_outage", 16, (f"--config.diloco.outages=((3, {T // 4}, {T // 4}),)",
                                 "--config.diloco.rejoin_reset_inner_opt=True"))]
  rows = []
  for name, m, extra in plan:
    r = run_one(name, m, T, D, out, extra)
    rows.append(r)
    print(f"{name}: M={m}, T={T}, {r['tokens_per_s']:.0f} tokens/s, peak RSS "
          f"{r['peak_rss_gib']:.2f} GiB, wall {r['wall_s']:.0f} s, final eval loss "
          f"{r['final_eval_loss']:.4f}, every array finite: {r['all_finite']}, worker "
          f"‖θ_m‖ {r['norms'][0]:.3f}-{r['norms'][1]:.3f}", flush=True)
  print(json.dumps(rows))
  return 0 if all(r["all_finite"] for r in rows) else 1


if __name__ == "__main__":
  app.run(main)
