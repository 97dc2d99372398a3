"""Real multi-process runs on this machine: launch/local.sh starts 2 processes on 127.0.0.1 (2
simulated CPU devices each, gloo collectives), the 4 workers spread over both.

Exactness: the packed wire all-gathers every worker's codes and sums them in worker order on each
device, so a 2-process run equals the single-process run bit for bit. (The reference wire's psum
is summed by gloo across processes but by XLA inside one process, in another order: last-bit
differences that training then carries along, up to ~1e-4 after 60 steps, so it is not used
here.) The sync diagnostics (cosine, quantizer error) are psums too and compared to 1e-5.

One 2-process run, one process killed after checkpoint 20 and the run restarted by
`local.sh --restart`: the finished run equals the uninterrupted single-process one bit for bit,
so the 2-process run does both before the kill and after the restart.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from diloco_jax import checkpoint, train

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60
# Streaming DiLoCo, τ=1, E3M0, M=2 workers each sharded FSDP over mesh.data=2 devices (one
# worker per process in the 2-process run); 2 blocks in one fragment plus the non-block one
# (P=2), so that few programs compile.
OVERRIDES = {"train.num_steps": STEPS, "diloco.inner_steps": 10, "diloco.wire": "packed",
             "diloco.num_workers": 2, "mesh.data": 2,
             "model.num_layers": 2, "diloco.layers_per_fragment": 2,
             "eval.every_steps": 20, "checkpoint.every_steps": 20, "train.log_every": 10}
HEARTBEAT_S = 10
TIMING_KEYS = {"tokens_per_s", "wall_time_s", "steps_this_run"}
DIAGNOSTIC = re.compile(r"outer_grad_cosine|quant_rel_error|outer_grad_norm")


def _config():
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location(
      "streaming_cfg", REPO / "experiments" / "configs" / "streaming.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  for key, value in OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _flags(workdir):
  return (["--config=experiments/configs/streaming.py:tiny", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def _local(n, workdir, cache_dir, *opts):
  # Both launches compile the same 2-process programs: the second reads them from JAX's
  # persistent compilation cache.
  env = {**os.environ, "PYTHON": sys.executable, "LOCAL_HEARTBEAT_S": str(HEARTBEAT_S),
         "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.Popen(["bash", "launch/local.sh", str(n), *opts, *_flags(workdir)], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_state(workdir):
  state, _ = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).restore_saved(STEPS)
  return jax.tree.leaves(state)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _assert_same_run(got_dir, want_dir):
  got, want = _final_state(got_dir), _final_state(want_dir)
  assert len(got) == len(want)
  for a, b in zip(got, want):   # every state leaf, bit for bit
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got_rows, want_rows = _rows(got_dir), _rows(want_dir)
  assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
  for g, w in zip(got_rows, want_rows):
    assert set(g) == set(w)
    for k in set(w) - TIMING_KEYS:
      if DIAGNOSTIC.match(k):
        assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (g["step"], k)
      else:
        assert g[k] == w[k], (g["step"], k)   # losses, bits, tokens: exact
  with open(os.path.join(got_dir, "summary.json")) as f, \
       open(os.path.join(want_dir, "summary.json")) as h:
    got_s, want_s = json.load(f), json.load(h)
  assert {k: v for k, v in got_s.items() if k not in TIMING_KEYS} == \
         {k: v for k, v in want_s.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
  """The same config in this process (4 of its simulated devices)."""
  workdir = str(tmp_path_factory.mktemp("single"))
  train.run(_config(), workdir)
  return workdir


def test_a_killed_process_stops_the_others_and_the_launcher_restarts_the_run(
    single_process, cache_dir, tmp_path):
  proc = _local(2, tmp_path, cache_dir, "--restart=1")
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  ckpt = tmp_path / "checkpoints" / "20"
  deadline = time.time() + 420
  while not ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert ckpt.is_dir(), "".join(lines)[-3000:]
  pids = dict(re.findall(r"local.sh: process (\d) pid (\d+)", "".join(lines)))
  os.kill(int(pids["1"]), signal.SIGKILL)
  killed = time.time()
  while "local.sh: restart 1" not in "".join(lines) and time.time() < killed + HEARTBEAT_S + 120:
    time.sleep(0.1)
  took = time.time() - killed
  proc.wait(timeout=480)
  reader.join(timeout=10)
  out = "".join(lines)
  assert proc.returncode == 0, out[-3000:]
  assert "local.sh: process 1 was ended by signal 9 (KILL)" in out
  # Process 0 ended itself (JAX's coordination service saw the missed heartbeats), with the
  # reason in its log; the launcher's safety net did not have to stop it.
  assert "another task died" in out, out[-3000:]
  assert re.search(r"local.sh: process 0 (was ended by signal 6|exited with status [1-9])", out)
  assert "still running" not in out
  assert took < HEARTBEAT_S + 60, took
  assert "local.sh: restart 1 of 1 on 2 processes, from the last checkpoint" in out
  assert "local.sh: process 0 exited with status 0" in out
  assert "local.sh: process 1 exited with status 0" in out
  # Both processes of the new attempt resumed from a checkpoint of the killed one (20, or 40 if
  # it was written before the kill landed) and finished: the run equals the uninterrupted one.
  assert re.search(r"\[p0\] resumed from step (20|40) in ", out), out[-3000:]
  assert out.count("final eval loss") == 1
  _assert_same_run(str(tmp_path), single_process)
