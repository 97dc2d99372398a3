"""Building blocks shared by the attention, MLP and transformer modules: initialisers, RMSNorm,
rotary positions and the no-op activation constraint."""

from __future__ import annotations

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


def _rope(x_BxLxHxK: jax.Array, base: float) -> jax.Array:
  """Rotates pairs (x[i], x[i + K/2]) by angle pos * base^(-2i/K): q.k then depends on offset only."""
  L, K = x_BxLxHxK.shape[1], x_BxLxHxK.shape[3]
  freq_F = base ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angle_LxF = jnp.arange(L, dtype=jnp.float32)[:, None] * freq_F[None, :]
  sin, cos = jnp.sin(angle_LxF)[None, :, None, :], jnp.cos(angle_LxF)[None, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)
