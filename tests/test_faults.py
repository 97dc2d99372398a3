"""Faults (issue 13): SIGTERM checkpoints and exits 0, and the next run resumes bit for bit; an
unreadable newest checkpoint is set aside and the run resumes from the one before."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diloco_jax import checkpoint, data, train
from tests.test_train import small_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _final(workdir, step=12):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state, host = ckpt.restore_saved(step)
  finally:
    ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(state)], host


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    r.pop("tokens_per_s")
  return rows


def _assert_same_run(got, want):
  (a, da), (b, db) = _final(got), _final(want)
  assert len(a) == len(b) > 5
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert da == db
  assert _rows(got) == _rows(want)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  train.run(small_config(), workdir)
  return workdir


class _SignalAt:
  """The training batches, but SIGTERM arrives while batch `n` is being drawn (inside step n),
  as a scheduler's notice would at any moment."""

  def __init__(self, inner, n):
    self._inner, self._n, self._drawn = inner, n, 0

  def __next__(self):
    self._drawn += 1
    if self._drawn == self._n:
      os.kill(os.getpid(), signal.SIGTERM)
    return next(self._inner)

  def __getattr__(self, name):
    return getattr(self._inner, name)


def test_sigterm_finishes_the_step_checkpoints_it_and_the_next_run_resumes_bit_for_bit(
    uninterrupted, tmp_path, monkeypatch, capsys):
  real = data.make_batches

  def make_batches(*args, **kwargs):
    it = real(*args, **kwargs)
    return _SignalAt(it, 7) if kwargs.get("split") == "train" else it

  monkeypatch.setattr(data, "make_batches", make_batches)
  before = signal.getsignal(signal.SIGTERM)
  out = train.run(small_config(), str(tmp_path))
  assert out == {"stopped_at": 7, "preempted": True}
  assert signal.getsignal(signal.SIGTERM) is before   # the trainer's handler is gone again
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1] == (f"preempted (SIGTERM): saved the checkpoint of step 7 of 12 in "
                       f"{tmp_path}; the same command resumes from it")
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"))
  assert ckpt.latest_step() == 7   # not the periodic one (every 4): the step SIGTERM was in
  ckpt.close()
  assert not (tmp_path / "summary.json").exists()
  monkeypatch.setattr(data, "make_batches", real)
  assert train.run(small_config(), str(tmp_path))["steps_this_run"] == 5
  _assert_same_run(str(tmp_path), uninterrupted)


def test_sigterm_on_the_command_line_exits_0_with_one_line(tmp_path):
  flags = ["--config=experiments/configs/diloco.py:tiny", f"--workdir={tmp_path}",
           "--config.train.num_steps=100000", "--config.train.log_every=1",
           "--config.checkpoint.every_steps=0"]
  proc = subprocess.Popen([sys.executable, "-m", "diloco_jax.main", *flags], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline and not (
      metrics.exists() and metrics.stat().st_size):   # training has started
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err
  last = out.strip().splitlines()[-1]
  assert last.startswith("preempted (SIGTERM): saved the checkpoint of step ") and \
      last.endswith(f" of 100000 in {tmp_path}; the same command resumes from it"), last
  step = int(last.split("step ")[1].split(" ")[0])
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"))
  assert ckpt.latest_step() == step >= 1
  ckpt.close()
  assert not (tmp_path / "summary.json").exists()


def _biggest_file(directory):
  files = [p for p in pathlib.Path(directory).rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_a_truncated_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
    uninterrupted, tmp_path, capsys):
  wd = str(tmp_path)
  assert train.run(small_config(), wd, stop_after=9) == {"stopped_at": 9}   # saved 4 and 8
  victim = _biggest_file(tmp_path / "checkpoints" / "8")
  with open(victim, "r+b") as f:
    f.truncate(100)
  capsys.readouterr()
  summary = train.run(small_config(), wd)
  out = capsys.readouterr().out.splitlines()
  said = [line for line in out if line.startswith("checkpoint 8 ")]
  assert len(said) == 1, out
  assert said[0].startswith(f"checkpoint 8 in {wd} cannot be read (") and said[0].endswith(
      f"); moved it to {wd}/unreadable_checkpoints and trying the one before")
  assert f"resumed from step 4 in {wd}" in out
  assert summary["steps_this_run"] == 8
  assert (tmp_path / "unreadable_checkpoints" / "8" / victim.relative_to(
      tmp_path / "checkpoints" / "8")).stat().st_size == 100   # kept for inspection
  _assert_same_run(wd, uninterrupted)


def test_when_no_checkpoint_reads_the_run_stops_with_one_sentence(tmp_path):
  wd = str(tmp_path)
  train.run(small_config(), wd, stop_after=9)
  for step in ("4", "8"):
    (tmp_path / "checkpoints" / step / "state" / "_METADATA").write_text("{")
  with pytest.raises(train.InputError, match=rf"^no checkpoint in {wd} can be read \(all moved "
                                             rf"to {wd}/unreadable_checkpoints\)"):
    train.run(small_config(), wd)
  assert sorted(os.listdir(tmp_path / "unreadable_checkpoints")) == ["4", "8"]
