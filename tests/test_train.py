"""End to end through train.run: a tiny run learns, interrupted-and-resumed equals uninterrupted
bit for bit, and every invalid config stops with one clear sentence before compiling."""

import json
import logging
import os
import re
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

from diloco_jax import checkpoint, fragments, host, train
from diloco_jax import config as config_lib
from diloco_jax import model as model_lib
from tests import overrides as overrides_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments", "configs"))
import diloco as diloco_configs  # noqa: E402


def small_config(**overrides):
  c = diloco_configs.get_config("tiny")
  c.diloco.num_workers = 2
  c.diloco.inner_steps = 4
  c.train.num_steps = 12
  c.train.batch_size = 4
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.data.seq_len = 16
  c.data.vocab_size = 32
  c.data.num_classes = 4
  c.eval.every_steps = 6
  c.eval.num_batches = 2
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 4
  return overrides_lib.apply(c, overrides)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_run_learns_and_writes_its_outputs(tmp_path):
  wd = str(tmp_path / "run")
  summary = train.run(small_config(**{"train.num_steps": 40, "diloco.inner_steps": 5,
                                      "eval.every_steps": 0, "train.learning_rate": 1e-2}), wd)
  rows = _rows(wd)
  assert [r["step"] for r in rows] == list(range(2, 41, 2))
  assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
  assert summary["final_eval_loss"] < float(np.log(32))   # below the uniform guess
  assert summary["entropy_floor"] < summary["final_eval_loss"]
  for key in ("final_eval_loss", "entropy_floor", "bits_sent_per_worker", "wall_time_s",
              "tokens_per_s"):
    assert key in summary
  with open(os.path.join(wd, "summary.json")) as f:
    saved = json.load(f)
  assert saved["final_eval_loss"] == summary["final_eval_loss"]
  assert saved["host"] == host.describe()   # the machine, so bit-level comparisons can check it
  # DiLoCo at M=2 sends one fp32 payload per worker every H=5 steps.
  n = summary["num_params"]
  assert rows[-1]["bits_sent_per_worker"] == 8 * n * 32
  assert rows[-1]["dp_bits_sent_per_worker"] == 40 * n * 32
  assert rows[-1]["tokens_seen"] == 40 * 2 * 4 * 16
  assert os.listdir(os.path.join(wd, "tb"))


@pytest.mark.parametrize("algorithm", ["diloco", "dp", "eager"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, algorithm):
  # "eager": DiLoCo with eager updates (per-worker outer copies and what each worker sent are
  # in the checkpoint too).
  cfg = (small_config(**{"diloco.eager": True}) if algorithm == "eager"
         else small_config(algorithm=algorithm))
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  train.run(cfg, full)
  # Stop at step 6: the last checkpoint is step 4, so steps 5-6 are lost and redone.
  assert train.run(cfg, cut, stop_after=6) == {"stopped_at": 6}
  resumed = train.run(cfg, cut)
  assert resumed["steps_this_run"] == 8
  a = checkpoint.Checkpointer(os.path.join(full, "checkpoints"))
  b = checkpoint.Checkpointer(os.path.join(cut, "checkpoints"))
  assert a.latest_step() == b.latest_step() == 12
  (sa, da), (sb, db) = a.restore_saved(12), b.restore_saved(12)
  leaves_a, leaves_b = jax.tree.leaves(sa), jax.tree.leaves(sb)
  assert len(leaves_a) == len(leaves_b) > 5
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert da == db
  a.close(), b.close()
  ra, rb = _rows(full), _rows(cut)
  assert [r["step"] for r in ra] == [r["step"] for r in rb]
  for x, y in zip(ra, rb):   # every value but the wall-clock rate
    x.pop("tokens_per_s"), y.pop("tokens_per_s")
    assert x == y


BAD = [
    ({"diloco.num_workers": 0}, r"diloco.num_workers must be an integer >= 1, got 0"),
    ({"diloco.inner_steps": 0}, r"diloco.inner_steps must be an integer >= 1, got 0"),
    ({"algorithm": "sgd"}, r"algorithm must be one of \('dp', 'diloco', 'streaming'\), got 'sgd'"),
    ({"train.batch_size": 3, "mesh.data": 2}, r"train.batch_size=3 must be divisible by mesh.data=2"),
    ({"data.source": "text", "data.paths": ("/nonexistent/x.txt",)},
     r"data.paths entry '/nonexistent/x.txt' matches no file"),
    ({"data.source": "text", "data.paths": ()}, r"data.paths must name at least one file"),
    ({"data.source": "c4"}, r"data.source must be one of \('synthetic', 'text'\)"),
    ({"model.preset": "7B"}, r"model.preset must be one of \('tiny', '35M', .*\), got '7B'"),
    ({"diloco.outer_momentum": 1.0}, r"diloco.outer_momentum must be in \[0, 1\)"),
    ({"train.learning_rate": 0.0}, r"train.learning_rate must be > 0"),
    ({"eval.params": "best"}, r"eval.params must be one of"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
    ({"train.b2": 1.0}, r"train.b2 must be in \[0, 1\), got 1.0"),
    ({"train.final_lr_fraction": -3.0}, r"train.final_lr_fraction must be in \[0, 1\]"),
]


def test_model_overrides_reach_the_model_config():
  rc = config_lib.from_config_dict(small_config(**{"model.tied_embeddings": False,
                                                   "model.mlp": "gelu", "model.num_layers": 3}))
  assert (rc.model.tied_embeddings, rc.model.mlp, rc.model.num_layers) == (False, "gelu", 3)
  rc = config_lib.from_config_dict(small_config())
  assert (rc.model.tied_embeddings, rc.model.mlp, rc.model.num_layers) == (True, "swiglu", 2)


@pytest.mark.parametrize("overrides,message", BAD)
def test_invalid_config_is_one_clear_sentence(overrides, message):
  with pytest.raises(train.ConfigError, match=message):
    config_lib.from_config_dict(small_config(**overrides))


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "diloco_jax.main",
       "--config=experiments/configs/diloco.py:tiny", *args],
      cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_values_and_unknown_keys_without_traceback(tmp_path):
  out = _cli(f"--workdir={tmp_path}", "--config.diloco.inner_steps=0")
  assert out.returncode == 2
  assert "config error: diloco.inner_steps must be an integer >= 1, got 0" in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")   # stopped before building anything
  out = _cli(f"--workdir={tmp_path}", "--config.diloco.inner_stepz=3")
  assert out.returncode != 0
  assert "inner_stepz" in out.stderr and "Traceback" not in out.stderr


def streaming_config(**overrides):
  base = {"algorithm": "streaming", "diloco.inner_steps": 4, "train.num_steps": 12,
          "checkpoint.every_steps": 5}
  c = small_config(**{**base, **overrides})
  return c


def _add_streaming_keys(c, **kw):
  with c.unlocked():
    c.diloco.layers_per_fragment = kw.get("layers", 1)
    c.diloco.fragment_pattern = "strided"
    c.diloco.overlap_steps = kw.get("tau", 2)
    c.diloco.merge_alpha = 0.5
    c.diloco.codec = kw.get("codec", "fp4_e3m0")
    c.diloco.codec_block_size = 32
    c.diloco.stochastic_rounding = kw.get("stochastic", True)
    c.diloco.error_feedback = kw.get("error_feedback", True)
    c.diloco.wire = "reference"
  return c


class _CompilesAfterAhead(logging.Handler):
  """The names of the programs jax compiles once train._compile_ahead has returned."""

  def __init__(self):
    super().__init__()
    self.names, self.on = [], False

  def emit(self, record):
    m = re.match(r"Compiling (\S+)", record.getMessage())
    if self.on and m:
      self.names.append(m.group(1))


def test_streaming_bits_and_peak_against_data_parallel_and_nothing_compiles_late(tmp_path):
  cfg = _add_streaming_keys(streaming_config(**{"checkpoint.every_steps": 0}), tau=1,
                            stochastic=False, error_feedback=False)
  seen = _CompilesAfterAhead()
  ahead = train._compile_ahead

  def compile_ahead(*args, **kw):
    ahead(*args, **kw)
    seen.on = True
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(seen)
  try:
    with jax.log_compiles(True), mock.patch.object(train, "_compile_ahead", compile_ahead):
      s = train.run(cfg, str(tmp_path))
  finally:
    logger.removeHandler(seen)
  # Every training program (inner step, sends, receives, the final sync, the evaluation) was
  # compiled before step 1; what compiles later is orbax slicing replicated arrays into the
  # checkpoint's shards at the first save.
  assert seen.on and set(seen.names) <= {"jit(slice)"}, seen.names
  rc = config_lib.from_config_dict(cfg)
  params = model_lib.init_params(rc.model, jax.random.PRNGKey(0))
  frags = fragments.by_blocks(params, layers_per_fragment=1)   # P = 3
  n = s["num_params"]
  assert sum(frags.sizes(params)) == n
  # One all-gather (M−1 = 1 forward) of 4-bit codes plus an fp32 scale per 32 values, each leaf
  # padded to whole blocks: Σ_leaves ceil(size/32)·(32·4 + 32) bits.
  wire = [sum(-(-x.size // 32) * (32 * 4 + 32) for x in frags.select(params, p))
          for p in range(3)]
  sends = {4: 0, 8: 0, 12: 0, 5: 1, 9: 1, 6: 2, 10: 2}   # H=4, offsets 0, 1, 2
  # The final sync after step 12: fragment 0 (sent at 12) lands without another send;
  # fragments 1 and 2 send once more.
  final = wire[1] + wire[2]
  assert s["bits_sent_per_worker"] == sum(wire[p] for p in sends.values()) + final
  assert s["peak_bits_per_step"] == wire[0] + final
  assert s["dp_bits_sent_per_worker"] == 12 * n * 32   # M=2 ring all-reduce: one fp32 payload
  rows = {r["step"]: r for r in _rows(str(tmp_path))}
  assert rows[4]["bits_this_step"] == wire[0] and rows[12]["bits_sent_per_worker"] == \
      s["bits_sent_per_worker"]
  assert rows[12]["bits_this_step"] == wire[0] + final
  assert {"outer_grad_norm/1", "outer_grad_norm/2"} <= set(rows[12])


STREAMING_BAD = [
    ({"diloco.inner_steps": 2}, {"tau": 1}, r"diloco.inner_steps \(H=2\) must be at least the number of fragments \(P=3\)"),
    ({}, {"layers": 3}, r"diloco.layers_per_fragment=3 must divide the number of blocks L=2"),
    ({}, {"tau": 4}, r"diloco.overlap_steps \(τ\) must be an integer with 0 <= τ < diloco.inner_steps \(H=4\)"),
    ({}, {"codec": "int4"}, r"diloco.codec must be one of"),
]


@pytest.mark.parametrize("overrides,keys,message", STREAMING_BAD)
def test_invalid_streaming_config_is_one_clear_sentence(tmp_path, overrides, keys, message):
  cfg = _add_streaming_keys(streaming_config(**overrides), **keys)
  with pytest.raises(train.ConfigError, match=message):
    train.run(cfg, str(tmp_path))


def test_metrics_writer_writes_non_finite_values_as_null_and_truncates_on_resume(tmp_path):
  from diloco_jax import metrics
  w = metrics.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"train_loss": float("nan"), "x": float("inf"), "y": 2.5})
  w.write(2, {"train_loss": 1.0})
  w.close()
  assert _rows(str(tmp_path)) == [{"step": 1, "train_loss": None, "x": None, "y": 2.5},
                                  {"step": 2, "train_loss": 1.0}]
  metrics.MetricsWriter(str(tmp_path), resume_step=1, tensorboard=False).close()
  assert [r["step"] for r in _rows(str(tmp_path))] == [1]


def test_init_from_starts_from_another_runs_outer_params(tmp_path):
  """train.init_from: the new run's initial params are the old run's final outer params; a
  model of other shapes is refused in one sentence."""
  from diloco_jax.evals import workdir as workdir_lib
  short = str(tmp_path / "short")
  train.run(small_config(**{"train.num_steps": 4, "eval.every_steps": 0}), short)
  want, _ = workdir_lib.restore_params(short, workdir_lib.load_run_config(short), "outer")
  like = model_lib.init_params(config_lib.from_config_dict(small_config()).model,
                               jax.random.key(1))
  got = train._initial_params(short, like)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)
  deeper = model_lib.init_params(config_lib.from_config_dict(
      small_config(**{"model.num_layers": 3})).model, jax.random.key(1))
  with pytest.raises(config_lib.ConfigError, match="holds a model of other shapes"):
    train._initial_params(short, deeper)
  with pytest.raises(config_lib.ConfigError, match="is not a training run's workdir"):
    config_lib.from_config_dict(small_config(**{"train.init_from": str(tmp_path)}))
