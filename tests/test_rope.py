"""RoPE for length (SPEC §6.2): position interpolation, YaRN's frequency ramp and temperature,
positions given explicitly; exact values, and the invariants every variant must keep."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import model
from diloco_jax.model.layers import _rope, rope_angles, rope_attention_scale, rope_frequencies

K, L = 8, 12


def rotate(x_LxK, positions_L, freq_F):
  """RoPE of one head's [L, K] at the given positions, through the model's own function."""
  return _rope(x_LxK[None, :, None, :], rope_angles(positions_L[None], freq_F))[0, :, 0]


def random(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape)


def test_plain_frequencies_are_base_powers():
  np.testing.assert_allclose(rope_frequencies(K, 10000.0), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_linear_scaling_is_plain_rope_at_positions_over_s(factor):
  x, positions = random((L, K), 0), jnp.arange(L, dtype=jnp.float32)
  scaled = rotate(x, positions, rope_frequencies(K, 10000.0, "linear", factor))
  plain = rotate(x, positions / factor, rope_frequencies(K, 10000.0))
  np.testing.assert_allclose(scaled, plain, rtol=1e-6, atol=1e-6)


def test_yarn_with_factor_one_is_plain_rope():
  yarn = rope_frequencies(K, 10000.0, "yarn", 1.0, original_length=64)
  np.testing.assert_array_equal(yarn, rope_frequencies(K, 10000.0))
  assert rope_attention_scale("yarn", 1.0) == 1.0


def test_yarn_frequencies_by_hand():
  """θ = 1, 0.1, 0.01, 0.001 with L_train = 1000 turn r = 1000·θ/2π = 159, 15.9, 1.59, 0.159
  times: the first (r >= 32) is kept, the last (r <= 1) divided by s, the middle two blended by
  γ = (r − 1)/31: θ' = γ·θ + (1 − γ)·θ/s."""
  s = 4.0
  gamma = [(1000 * theta / (2 * math.pi) - 1) / 31 for theta in (0.1, 0.01)]
  expected = [1.0, gamma[0] * 0.1 + (1 - gamma[0]) * 0.1 / s,
              gamma[1] * 0.01 + (1 - gamma[1]) * 0.01 / s, 0.001 / s]
  got = rope_frequencies(K, 10000.0, "yarn", s, original_length=1000, beta_fast=32.0,
                         beta_slow=1.0)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(expected, [1.0, 0.0610859, 0.00264312, 0.00025], rtol=1e-5)


def test_yarn_temperature():
  """√(1/t) = 0.1·ln(s) + 1 multiplies q and k each, so the logits grow by its square."""
  assert rope_attention_scale("yarn", 8.0) == pytest.approx(0.1 * math.log(8.0) + 1)
  assert rope_attention_scale("linear", 8.0) == rope_attention_scale("none", 1.0) == 1.0


SCALINGS = [("none", 1.0), ("linear", 4.0), ("yarn", 4.0)]


@pytest.mark.parametrize("scaling,factor", SCALINGS)
def test_rotation_preserves_the_norm(scaling, factor):
  x = random((L, K), 1)
  freq = rope_frequencies(K, 10000.0, scaling, factor, original_length=8)
  positions = jnp.array([0, 3, 1, 7, 100, 5000, 2, 2, 9, 11, 0, 1], jnp.float32)
  np.testing.assert_allclose(np.linalg.norm(rotate(x, positions, freq), axis=-1),
                             np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("scaling,factor", SCALINGS)
def test_scores_depend_only_on_the_offset(scaling, factor):
  """The same q and k everywhere: q_m·k_n is a function of m − n, including when every
  position is shifted (a document packed later in a row with positions not restarted)."""
  q, k = random((K,), 2), random((K,), 3)
  freq = rope_frequencies(K, 10000.0, scaling, factor, original_length=8)
  scores = lambda start: np.asarray(
      rotate(jnp.broadcast_to(q, (L, K)), start + jnp.arange(L, dtype=jnp.float32), freq)
      @ rotate(jnp.broadcast_to(k, (L, K)), start + jnp.arange(L, dtype=jnp.float32), freq).T,
      np.float64)
  s_LxL = scores(0.0)
  for m in range(L - 1):
    for n in range(L - 1):
      assert abs(s_LxL[m + 1, n + 1] - s_LxL[m, n]) < 1e-4
  np.testing.assert_allclose(scores(37.0), s_LxL, atol=1e-4)
  assert abs(s_LxL[3, 0] - s_LxL[0, 0]) > 1e-2   # it really rotates


def test_the_model_uses_the_scaling():
  """yarn with s = 1 is the plain model exactly; linear and yarn with s = 4 change the logits."""
  plain = model.config_from_preset("tiny", num_layers=1, vocab_size=32)
  params = model.init_params(plain, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 32)
  logits = lambda **kw: model.apply(dataclasses.replace(plain, **kw), params, tokens)[0]
  base = logits()
  np.testing.assert_array_equal(logits(rope_scaling="yarn", rope_original_length=16), base)
  for scaling in ("linear", "yarn"):
    other = logits(rope_scaling=scaling, rope_scaling_factor=4.0, rope_original_length=16)
    assert np.isfinite(np.asarray(other)).all()
    assert np.abs(np.asarray(other - base)).max() > 1e-4


@pytest.mark.parametrize("overrides,message", [
    (dict(rope_scaling="foo"),
     r"^model.rope_scaling must be one of \('none', 'linear', 'yarn'\), got 'foo'$"),
    (dict(rope_scaling_factor=0.5), r"^model.rope_scaling_factor must be a number >= 1, got 0.5$"),
    (dict(rope_scaling="yarn", rope_scaling_factor=4.0),
     r"^model.rope_original_length must be an integer >= 1 \(the training length\) with "
     r"model.rope_scaling='yarn', got 0$"),
    (dict(rope_scaling="yarn", rope_original_length=64, yarn_beta_slow=40.0),
     r"^model.yarn_beta_slow \(40.0\) must be >= 0 and below model.yarn_beta_fast \(32.0\)$"),
])
def test_bad_rope_config_is_one_sentence(overrides, message):
  with pytest.raises(ValueError, match=message):
    model.config_from_preset("tiny", **overrides)
