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


def _by_path(tree, np_asarray=True):
  """{"local_params/embed/...": leaf}: the same names for a state and its restore_saved tree
  (which comes back as nested dicts)."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): np.asarray(x) if np_asarray else x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


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


def test_a_stream_of_fewer_workers_starts_where_the_saved_one_stopped():
  source = data.SyntheticLanguage(vocab_size=32, num_classes=4, seed=0)
  kw = dict(batch_size=2, seq_len=8, seed=3, num_threads=0)
  two = data.make_batches(source, num_workers=2, **kw)
  for _ in range(3):   # the saved run read steps 0-2: stream positions 0-11
    next(two)
  saved = two.get_state()
  unread = next(two)   # positions 12-15: position 12 + b*2 + m is row b of worker m
  one = data.make_batches(source, num_workers=1, **kw)
  one.set_state(data.state_for_fewer_workers(saved, 2, one))
  assert one.get_state()["next_index"] == 6   # ⌈3 · 2 / 1⌉: positions 12, 13 first
  got = next(one)
  np.testing.assert_array_equal(got[0, 0], unread[0, 0])   # position 12
  np.testing.assert_array_equal(got[0, 1], unread[1, 0])   # position 13
  three = data.make_batches(source, num_workers=3, **kw)
  with pytest.raises(ValueError, match="is not one of 2 >= 3 workers"):
    data.state_for_fewer_workers(saved, 2, three)
  for it in (two, one, three):
    it.close()


def test_a_checkpoint_of_more_workers_resumes_with_the_first_ones_only_when_allowed(
    tmp_path, monkeypatch, capsys):
  wd = str(tmp_path)
  assert train.run(small_config(), wd, stop_after=5) == {"stopped_at": 5}   # saved 4
  fewer = small_config(**{"diloco.num_workers": 1})
  with pytest.raises(train.InputError, match=(
      rf"^checkpoint 4 in {wd}/checkpoints cannot be restored onto this run: it was saved by 2 "
      rf"workers and this config has 1 \(diloco.num_workers\); set "
      rf"train.allow_fewer_workers=True to resume with its first 1 workers; resume with the "
      rf"config that wrote it \({wd}/config.json is the latest run's\) or use another workdir$")):
    train.run(fewer, wd)
  bigger = small_config(**{"model.d_model": 48})   # a readable checkpoint of another model
  with pytest.raises(train.InputError, match=r"cannot be restored onto this run: array \d+ was "
                                             r"saved as float32\[.*\] and this config's state"):
    train.run(bigger, wd)
  assert os.listdir(tmp_path / "checkpoints") == ["4"]   # neither error moved it aside
  assert not (tmp_path / "unreadable_checkpoints").exists()

  ckpt = checkpoint.Checkpointer(os.path.join(wd, "checkpoints"))
  saved = _by_path(ckpt.restore_saved(4)[0])
  ckpt.close()
  real, got = checkpoint.Checkpointer.restore_newest_readable, {}

  def spy(self, *args, **kwargs):   # a copy: training donates the restored buffers
    out = real(self, *args, **kwargs)
    got["out"] = (out[0], _by_path(out[1]), {k: checkpoint._is_worker_leaf(x) for k, x in
                                             _by_path(out[1], np_asarray=False).items()},
                  *out[2:])
    return out

  monkeypatch.setattr(checkpoint.Checkpointer, "restore_newest_readable", spy)
  capsys.readouterr()
  summary = train.run(small_config(**{"diloco.num_workers": 1, "train.allow_fewer_workers": True}),
                      wd)
  assert (f"resumed from step 4 in {wd} with the first 1 of its 2 workers"
          in capsys.readouterr().out)
  assert summary["steps_this_run"] == 8 and summary["num_steps"] == 12
  step, leaves, cut, host, skipped = got["out"]
  assert (step, skipped, host["num_workers"]) == (4, [], 2)
  assert leaves.keys() == saved.keys()
  assert 5 < sum(cut.values()) < len(leaves)   # per-worker leaves and shared ones
  for k, x in leaves.items():
    np.testing.assert_array_equal(x, saved[k][:1] if cut[k] else saved[k], err_msg=k)
  assert np.isfinite(summary["final_eval_loss"])
