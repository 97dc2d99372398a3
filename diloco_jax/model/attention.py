"""Causal multi-head self-attention with QK-norm and rotary positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diloco_jax.model import kernels, ring
from diloco_jax.model.blockwise import blockwise_attention
from diloco_jax.model.config import ModelConfig
from diloco_jax.model.layers import (RMSNorm, _no_constraint, _normal, _rope, dense, rope_angles,
                                     rope_attention_scale, rope_frequencies)


def segment_mask(segment_ids_BxL: jax.Array | None, L: int) -> jax.Array:
  """Who query i may see: key j iff j <= i and (with segment ids) both share a segment;
  [B or 1, 1, L, L] bool, broadcastable over the heads."""
  causal_1x1xLxL = jnp.tril(jnp.ones((L, L), bool))[None, None]
  if segment_ids_BxL is None:
    return causal_1x1xLxL
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_1x1xLxL & same_BxLxL[:, None]


def dense_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL=None):
  """The reference: every score [B, H, L, L] in float32, the mask, a softmax; q unscaled.

  The backward is written out (`_dense_bwd`) rather than left to autodiff, which gives the same
  maths (tests/test_attention.py checks it against a plain autodiff reference) but lets us pick
  the form of each matmul: a batched dot on XLA:CPU wants [M, K] × [K, N] operands and makes a
  physical copy of any other, and autodiff's dK = dSᵀ·Q and dV = Pᵀ·dO transpose the two
  [L, L] matrices. Computed as dKᵀ = Qᵀ·dS and dVᵀ = dOᵀ·P, only [L, K] operands move."""
  return _dense(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL)


def _heads_major(x_BxLxHxK):
  return x_BxLxHxK.transpose(0, 2, 1, 3)   # [B, H, L, K]: the batched dots' layout


def _batched(lhs, rhs, contract):
  """A dot batched over (B, H), accumulating in float32."""
  return jax.lax.dot_general(lhs, rhs, (contract, ((0, 1), (0, 1))),
                             preferred_element_type=jnp.float32)


def _dense_fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL):
  L, K = q_BxLxHxK.shape[1], q_BxLxHxK.shape[3]
  # q scaled by 1/√K before the dot ([L, K] values, fused into the transpose) rather than the
  # scores after it: XLA:CPU would otherwise broadcast the constant to a [B, H, L, L] array
  # for the library dot's epilogue.
  qs_BxLxHxK = q_BxLxHxK * jnp.asarray(K**-0.5, q_BxLxHxK.dtype)
  q, k, v = map(_heads_major, (qs_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  s_BxHxLxL = _batched(q, k, ((3,), (3,)))                                 # Q·Kᵀ/√K
  s_BxHxLxL = jnp.where(segment_mask(segment_ids_BxL, L), s_BxHxLxL, jnp.finfo(jnp.float32).min)
  p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1)   # in float32
  # P·V with P as the [M, K] operand (jnp.einsum may compute (Vᵀ·Pᵀ)ᵀ, copying P transposed).
  o_BxLxHxK = _heads_major(_batched(p_BxHxLxL.astype(v.dtype), v, ((3,), (2,))))
  o_BxLxHxK = o_BxLxHxK.astype(v_BxLxHxK.dtype)
  return o_BxLxHxK, (qs_BxLxHxK, k_BxLxHxK, v_BxLxHxK, p_BxHxLxL, o_BxLxHxK)


def _dense_bwd(residuals, do_BxLxHxK):
  qs_BxLxHxK, k_BxLxHxK, v_BxLxHxK, p_BxHxLxL, o_BxLxHxK = residuals
  f32, K, batched = jnp.float32, qs_BxLxHxK.shape[3], _batched
  q, k, v, do = map(_heads_major, (qs_BxLxHxK, k_BxLxHxK, v_BxLxHxK, do_BxLxHxK))
  dp_BxHxLxL = batched(do, v, ((3,), (3,)))                           # dO·Vᵀ
  # softmax backward: dS = P ⊙ (dP − rowsum(dO ⊙ O)), masked entries already 0 through P.
  delta_BxHxLx1 = _heads_major(jnp.sum(do_BxLxHxK.astype(f32) * o_BxLxHxK.astype(f32), -1,
                                       keepdims=True))
  ds_BxHxLxL = p_BxHxLxL * (dp_BxHxLxL - delta_BxHxLx1)
  dq_BxHxLxK = batched(ds_BxHxLxL.astype(k.dtype), k, ((3,), (2,))) * K**-0.5   # dS·K/√K
  dkT_BxHxKxL = batched(q, ds_BxHxLxL.astype(q.dtype), ((2,), (2,)))  # (Q/√K)ᵀ·dS
  dvT_BxHxKxL = batched(do, p_BxHxLxL.astype(do.dtype), ((2,), (2,)))  # dOᵀ·P
  back = lambda x_BxHxKxL, like: x_BxHxKxL.transpose(0, 3, 1, 2).astype(like.dtype)
  return (_heads_major(dq_BxHxLxK).astype(qs_BxLxHxK.dtype), back(dkT_BxHxKxL, k_BxLxHxK),
          back(dvT_BxHxKxL, v_BxLxHxK), None)


_dense = jax.custom_vjp(lambda q, k, v, segment_ids: _dense_fwd(q, k, v, segment_ids)[0])
_dense.defvjp(_dense_fwd, _dense_bwd)


class Attention(nnx.Module):
  """Causal multi-head self-attention with QK-norm (per head) and rotary positions."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.cfg = cfg  # weights: wq/wk/wv [D, H, K], wo [H, K, D]
    self.wq = _normal(rngs, (D, H, K), D**-0.5)
    self.wk = _normal(rngs, (D, H, K), D**-0.5)
    self.wv = _normal(rngs, (D, H, K), D**-0.5)
    self.wo = _normal(rngs, (H, K, D), (H * K) ** -0.5)
    # QK-norm bounds the attention logits, which keeps large-model training stable.
    self.q_norm = RMSNorm(K, cfg.norm_eps)
    self.k_norm = RMSNorm(K, cfg.norm_eps)

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint,
               positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """positions [B, L] int (None: 0..L-1) rotate q and k; segment_ids [B, L] int (None: one
    document per row) keep every query inside its own document."""
    cfg, dt, L = self.cfg, x_BxLxD.dtype, x_BxLxD.shape[1]
    heads = lambda y: constrain(y, ("batch", "length", "heads", None))
    q_BxLxHxK = dense(x_BxLxD, self.wq[...].astype(dt), 1, constrain)
    k_BxLxHxK = dense(x_BxLxD, self.wk[...].astype(dt), 1, constrain)
    v_BxLxHxK = heads(dense(x_BxLxD, self.wv[...].astype(dt), 1, constrain))
    q_BxLxHxK, k_BxLxHxK = heads(q_BxLxHxK), heads(k_BxLxHxK)
    if positions_BxL is None:
      positions_BxL = jnp.arange(L)[None, :]
    freq_F = rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling,
                              cfg.rope_scaling_factor, cfg.rope_original_length,
                              cfg.yarn_beta_fast, cfg.yarn_beta_slow)
    angle_BxLxF = rope_angles(positions_BxL, freq_F)
    q_BxLxHxK = _rope(self.q_norm(q_BxLxHxK), angle_BxLxF)
    k_BxLxHxK = _rope(self.k_norm(k_BxLxHxK), angle_BxLxF)
    temperature = rope_attention_scale(cfg.rope_scaling, cfg.rope_scaling_factor)
    if temperature != 1.0:   # YaRN: q and k each by √(1/t), the logits by 1/t
      q_BxLxHxK, k_BxLxHxK = q_BxLxHxK * temperature, k_BxLxHxK * temperature
    if cfg.attention in ("blockwise", "splash"):
      block = min(cfg.attention_block, L)
      if L % block:
        raise ValueError(f"model.attention_block={block} must divide the sequence length {L}")
    qkv = (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
    if cfg.attention == "blockwise":
      o_BxLxHxK = blockwise_attention(*qkv, block, segment_ids_BxL)
    elif cfg.attention == "cudnn":
      o_BxLxHxK = kernels.cudnn_attention(*qkv, segment_ids_BxL)
    elif cfg.attention == "splash":
      o_BxLxHxK = kernels.splash_attention(*qkv, segment_ids_BxL, block)
    elif cfg.attention == "ring" and getattr(constrain, "mesh", None) is not None:
      # The sequence may be in the load-balanced order (`Transformer`); within a document the
      # positions grow with the original index, so (positions, segment ids) give the causal
      # mask in any layout.
      index_BxL = jnp.broadcast_to(positions_BxL, x_BxLxD.shape[:2])
      o_BxLxHxK = ring.ring_attention(*qkv, index_BxL, segment_ids_BxL, constrain.mesh)
    else:   # dense, and ring without a mesh (a ring of one device is dense attention)
      o_BxLxHxK = dense_attention(*qkv, segment_ids_BxL)
    out_BxLxD = dense(heads(o_BxLxHxK), self.wo[...].astype(dt), 2, constrain)
    return constrain(out_BxLxD, ("batch", "length", None))
