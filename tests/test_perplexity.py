"""Long-context loss: the cumulative mean by hand, the power-law fit recovering known (α, β, γ)
with and without noise, windows of long documents, per-position loss equal to a direct
computation, and the JSON + PNG output; the command on a tiny run with its errors."""

import json
import os

import jax
import numpy as np
import pytest

from diloco_jax import model as model_lib
from diloco_jax.evals import heldout
from diloco_jax.evals import perplexity as ppl


def test_cumulative_mean_by_hand():
  np.testing.assert_allclose(ppl.cumulative_mean([4.0, 2.0, 0.0, 2.0]), [4.0, 3.0, 2.0, 2.0])
  np.testing.assert_allclose(ppl.cumulative_mean([[1.0, 3.0], [2.0, 2.0]]),
                             [[1.0, 2.0], [2.0, 2.0]])
  with pytest.raises(ValueError, match="loss_per_position must be a non-empty array"):
    ppl.cumulative_mean([])


@pytest.mark.parametrize("alpha, beta, gamma", [(2.0, -0.5, 1.2), (0.8, -0.2, 0.9),
                                                (5.0, -1.3, 0.3), (1.5, -0.05, -0.4)])
def test_fit_recovers_known_parameters(alpha, beta, gamma):
  x = np.arange(1, 4097, dtype=np.float64)
  y = ppl.power_law(x, alpha, beta, gamma)
  a, b, g = ppl.fit_power_law(x, y)
  np.testing.assert_allclose([a, b, g], [alpha, beta, gamma], rtol=1e-6, atol=1e-8)


def test_fit_with_small_noise():
  rng = np.random.default_rng(0)
  x = np.arange(1, 2049, dtype=np.float64)
  y = ppl.power_law(x, 2.0, -0.5, 1.2) + rng.normal(0.0, 1e-3, x.size)
  a, b, g = ppl.fit_power_law(x, y)
  assert abs(a - 2.0) < 0.02 and abs(b + 0.5) < 0.01 and abs(g - 1.2) < 0.005
  # log-spaced positions, a few points (what a short curve gives)
  x = np.unique(np.geomspace(1, 1e5, 40).round())
  y = ppl.power_law(x, 1.0, -0.3, 0.7) + rng.normal(0.0, 1e-4, x.size)
  a, b, g = ppl.fit_power_law(x, y)
  assert abs(a - 1.0) < 0.01 and abs(b + 0.3) < 0.005 and abs(g - 0.7) < 0.005


def test_fit_bad_input():
  with pytest.raises(ValueError, match="same length"):
    ppl.fit_power_law([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="at least 3 points"):
    ppl.fit_power_law([1, 2], [1, 2])
  with pytest.raises(ValueError, match="x must be positive"):
    ppl.fit_power_law([0, 1, 2], [1, 2, 3])
  with pytest.raises(ValueError, match="3 distinct"):
    ppl.fit_power_law([1, 1, 2], [1, 2, 3])


def test_formula():
  assert ppl.formula(1.23, -0.456, 0.789) == "L(x) = 1.23·x^-0.456 + 0.789"
  assert ppl.formula(1.0, -0.5, -0.25) == "L(x) = 1·x^-0.5 − 0.25"


def test_windows_never_span_documents():
  docs = [np.arange(25, dtype=np.uint8), b"abcdefghij", "xy"]
  w = ppl.windows(docs, 4)
  assert w.shape == (7, 5) and w.dtype == np.int32
  np.testing.assert_array_equal(w[:5].ravel(), np.arange(25))
  assert bytes(w[5:].astype(np.uint8).ravel()) == b"abcdefghij"
  np.testing.assert_array_equal(ppl.windows(docs, 4, max_windows=3), w[[0, 3, 6]])
  with pytest.raises(ppl.PerplexityError, match="no document holds one window of seq_len"):
    ppl.windows(["short"], 10)


def test_position_losses_equal_direct_computation_and_write(tmp_path):
  cfg = model_lib.ModelConfig(vocab_size=256, num_layers=1, d_model=32, num_heads=2, ffn_dim=64)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  apply_fn = heldout.model_apply(cfg)
  rng = np.random.default_rng(0)
  docs = [rng.integers(97, 123, 700).astype(np.uint8), rng.integers(97, 123, 300).astype(np.uint8)]
  result = ppl.evaluate(apply_fn, params, docs, 32, max_windows=None, batch_size=8,
                        train_length=16)
  w = ppl.windows(docs, 32)
  assert result["windows"] == len(w) == 21 + 9   # 30 windows: 3 full batches and a padded one
  direct = jax.jit(heldout.token_losses, static_argnums=0)   # one forward over all windows
  want = np.asarray(direct(apply_fn, params, w), np.float64).mean(0)
  np.testing.assert_allclose(result["per_position_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(result["cumulative_mean"], ppl.cumulative_mean(want), rtol=1e-5)
  assert result["positions"] == list(range(1, 33)) and result["extrapolation"]
  fit = result["fit"]
  assert set(fit) == {"alpha", "beta", "gamma", "formula", "rmse"} and np.isfinite(fit["rmse"])
  paths = ppl.write(result, str(tmp_path / "out"))
  with open(paths["json"]) as f:
    assert json.load(f) == json.loads(json.dumps(result))
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# The command on a tiny trained run.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny 2-step byte-level run; its held-out split is 1 % of a 20 kB file."""
  import sys  # noqa: PLC0415
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "experiments", "configs"))
  import diloco as diloco_configs  # noqa: PLC0415

  from diloco_jax import train  # noqa: PLC0415

  d = tmp_path_factory.mktemp("ppl_run")
  words = np.random.default_rng(0).choice("the cat sat on a mat and ran far away".split(), 5000)
  (d / "a.txt").write_text(" ".join(words) + "\n")
  c = diloco_configs.get_config("tiny")
  for key, value in {
      "diloco.num_workers": 2, "diloco.inner_steps": 2, "train.num_steps": 2,
      "train.batch_size": 2, "train.warmup_steps": 1, "train.log_every": 2,
      "model.num_layers": 1, "data.source": "text", "data.paths": (str(d / "a.txt"),),
      "data.seq_len": 16, "eval.every_steps": 0, "eval.num_batches": 1, "eval.batch_size": 2,
      "checkpoint.every_steps": 0}.items():
    section, name = key.split(".")
    c[section][name] = value
  wd = str(d / "workdir")
  train.run(c, wd)
  return wd


def test_command_end_to_end_and_errors(run, tmp_path, capsys):
  out = tmp_path / "ppl"
  assert ppl.main(["perplexity", f"--workdir={run}", "--seq_len=48", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert "(extrapolation)" in printed and "L(x) = " in printed
  with open(out / "perplexity.json") as f:
    result = json.load(f)
  assert (result["step"], result["seq_len"], result["train_length"]) == (2, 48, 16)
  assert result["windows"] >= 2 and len(result["cumulative_mean"]) == 48
  assert os.path.getsize(out / "perplexity.png") > 1000
  cases = [
      (["--workdir=/nonexistent"], "flag error: --workdir '/nonexistent' is not a directory"),
      ([f"--workdir={run}", "--text=/nonexistent"],
       "flag error: --text '/nonexistent' is not a file"),
      ([f"--workdir={tmp_path}"], "config error: workdir"),
      ([f"--workdir={run}", "--seq_len=5000", f"--out={tmp_path}/o"],
       "error: no document holds one window"),
  ]
  for args, message in cases:
    assert ppl.main(["perplexity"] + args) == 2, args
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message), err
