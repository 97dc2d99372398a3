"""Building blocks shared by the attention, MLP and transformer modules: initialisers, RMSNorm,
rotary positions and the no-op activation constraint."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _no_constraint(x: jax.Array, names: tuple) -> jax.Array:
  del names
  return x

def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
  """A float32 normal init. Hidden matrices use std 1/sqrt(fan_in) so activations keep unit scale."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32 for stability."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rope_frequencies(head_dim: int, base: float, scaling: str = "none", factor: float = 1.0,
                     original_length: int = 0, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> jax.Array:
  """The K/2 rotation frequencies θ_i = base^(-2i/K) [F], rescaled for length (SPEC §6.2).

  "linear" (position interpolation): θ_i / s, i.e. position p rotates as p / s did.
  "yarn" (Peng et al. 2023, "NTK-by-parts"): a frequency whose wavelength λ_i = 2π/θ_i fits
  r_i = L_train / λ_i times in the original length keeps θ_i if r_i >= β_fast (high frequencies
  already saw every angle: extrapolate), becomes θ_i / s if r_i <= β_slow (it never completed a
  turn: interpolate), and is blended linearly in r between the two.
  """
  freq_F = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling == "linear":
    return freq_F / factor
  if scaling == "yarn":
    rotations_F = original_length * freq_F / (2 * math.pi)
    keep_F = jnp.clip((rotations_F - beta_slow) / (beta_fast - beta_slow), 0.0, 1.0)
    # γ·θ + (1 − γ)·θ/s, written so that s = 1 gives θ bit for bit.
    return freq_F * (1 + keep_F * (factor - 1)) / factor
  return freq_F


def rope_attention_scale(scaling: str, factor: float) -> float:
  """The factor q and k are each multiplied by after RoPE: YaRN's √(1/t) = 0.1·ln(s) + 1, so the
  logits are sharpened by 1/t = (0.1·ln(s) + 1)², which offsets the flatter softmax a longer
  context gives (the paper's fit); 1 for every other scaling."""
  return 0.1 * math.log(factor) + 1.0 if scaling == "yarn" else 1.0


def rope_angles(positions_BxL: jax.Array, freq_F: jax.Array) -> jax.Array:
  """The rotation angles position · θ_i [B, L, F], float32."""
  return positions_BxL.astype(jnp.float32)[..., None] * freq_F


def _rope(x_BxLxHxK: jax.Array, angles: jax.Array | float) -> jax.Array:
  """Rotates pairs (x[i], x[i + K/2]) by the angles [B, L, K/2] (`rope_angles`): q·k then
  depends on the offset of the two positions only. A float instead is a base: plain RoPE at
  positions 0..L-1, θ_i = base^(-2i/K). (One argument for both keeps `_rope(x, base)` a
  two-argument function that tests can swap for the identity.)"""
  L, K = x_BxLxHxK.shape[1], x_BxLxHxK.shape[3]
  if isinstance(angles, (int, float)):
    angles = rope_angles(jnp.arange(L)[None, :], rope_frequencies(K, angles))
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)
