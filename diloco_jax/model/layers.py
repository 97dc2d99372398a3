"""Building blocks shared by the attention, MLP and transformer modules: initialisers, RMSNorm,
rotary positions and the no-op activation constraint."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diloco_jax import mesh as mesh_lib


def _no_constraint(x: jax.Array, names: tuple) -> jax.Array:
  del names
  return x

def dense(x: jax.Array, w: jax.Array, contract: int = 1, constrain=_no_constraint,
          **dot_kwargs) -> jax.Array:
  """x [..., *w.shape[:contract]] times w → [..., *w.shape[contract:]].

  Inside a worker that is one device (no data, context or model axis above 1 in the mesh of
  `constrain`: the simulated workers on CPU), one 2-D matmul over [B·L, D]. Why not an einsum
  over [B, L, D] there: XLA:CPU canonicalises the weight gradient of a 3-D dot,
  dW = Σ_{b,l} x ⊗ dy, through a physically transposed copy of dy ([F, B·L], written with a
  stride of the row length: cache-miss bound, 30-44 ms of a 150 ms step in docs/cpu_speed.md),
  while for [B·L, D] operands it emits one matmul contracting the rows of both, with no copy
  (the reshapes are free, row-major bitcasts). A worker sharded over several devices keeps the
  einsum: with the batch dimension merged, a run split over two processes stopped being bit
  for bit the run in one (tests/test_multiprocess.py), which the einsum keeps."""
  if _shards_inside_worker(constrain):
    letters = "abcdefgh"
    lead, ins, outs = (letters[:x.ndim - contract], letters[x.ndim - contract:x.ndim],
                       letters[x.ndim:x.ndim + w.ndim - contract])
    return jnp.einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, w, **dot_kwargs)
  lead, n_in = x.shape[:x.ndim - contract], math.prod(w.shape[:contract])
  y = _matmul(x.reshape(-1, n_in), w.reshape(n_in, -1), dot_kwargs.get("preferred_element_type"))
  return y.reshape(*lead, *w.shape[contract:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_NxI, w_IxO, preferred_element_type=None):
  return jnp.dot(x_NxI, w_IxO, preferred_element_type=preferred_element_type)


def _matmul_fwd(x_NxI, w_IxO, preferred_element_type):
  return _matmul(x_NxI, w_IxO, preferred_element_type), (x_NxI, w_IxO)


def _matmul_bwd(preferred_element_type, residuals, dy_NxO):
  """dX = dY·Wᵀ and dW = Xᵀ·dY, with the transposed copy of the narrower of X and dY. Under the
  algorithm's vmap over workers these dots are batched, and XLA:CPU runs a batched dot only in
  the [M, K] × [K, N] form, copying whatever operand is not: left to itself it transposes dY
  ([N, 512] for an MLP's up projection); this transposes X ([N, 128]), or for the down
  projection dY, computing dWᵀ and transposing that (weight-sized, not N-sized)."""
  del preferred_element_type
  x_NxI, w_IxO = residuals
  dy = dy_NxO.astype(x_NxI.dtype)
  dx_NxI = jnp.dot(dy, w_IxO.T.astype(dy.dtype))
  if x_NxI.shape[1] <= dy.shape[1]:
    dw_IxO = jnp.dot(x_NxI.T, dy, preferred_element_type=jnp.float32)
  else:
    dw_IxO = jnp.dot(dy.T, x_NxI, preferred_element_type=jnp.float32).T
  return dx_NxI.astype(x_NxI.dtype), dw_IxO.astype(w_IxO.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _shards_inside_worker(constrain) -> bool:
  mesh = getattr(constrain, "mesh", None)
  return mesh is not None and mesh_lib.devices_per_worker(mesh) > 1


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
  # out = [x1·cos − x2·sin, x2·cos + x1·sin] written as x·[cos, cos] + swap(x)·[−sin, sin],
  # the halves swapped by reversing an axis of size 2: the same values bit for bit, without the
  # concatenate of the activations, which XLA:CPU's loop emitter evaluates element by element
  # with a branch (~10 % of a small model's step); only the [B, L, K] angle tables are joined.
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  cos_BxLx1xK = jnp.concatenate([cos, cos], axis=-1)
  sin_BxLx1xK = jnp.concatenate([-sin, sin], axis=-1)
  x = x_BxLxHxK.astype(jnp.float32)
  swapped = jnp.flip(x.reshape(*x.shape[:-1], 2, K // 2), axis=-2).reshape(x.shape)
  return (x * cos_BxLx1xK + swapped * sin_BxLx1xK).astype(x_BxLxHxK.dtype)
