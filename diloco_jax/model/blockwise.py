"""Memory-efficient causal attention in pure JAX (flash-attention style, SPEC §6.2).

    o_i = Σ_{j ≤ i} softmax_j(q_i·k_j / √K) v_j      computed one [b_q × b_k] tile at a time

Forward: for each query block, an online softmax over its key blocks 0..i (the blocks above the
diagonal are never visited: the loop's trip count is i + 1), keeping the running max m, the
running sum l and the unnormalised output; it stores only o and the log-sum-exp m + log l per
query, O(L·K) instead of the [L, L] scores. Backward (a `custom_vjp`, FlashAttention-2's): with
D = Σ_k dO·O per query, the probabilities are recomputed tile by tile from the saved
log-sum-exp, dS = P ⊙ (dO·Vᵀ − D); one pass over query blocks accumulates dQ, one pass over key
blocks accumulates dK and dV. Nothing of size [L, L] is ever materialised, in either direction.

Document packing: with segment ids, key j is also masked out of query i's row unless they
share a segment. A masked score is the float32 minimum, so a tile whose row is all masked only
adds garbage that the first real score's correction factor exp(min − m) = 0 wipes out; every
row reaches its own diagonal, so it always has one. (Tiles wholly across documents are still
computed: only the causal skipping is structural.)

Scores, softmax and accumulators are float32 whatever the input dtype; the output takes q's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


def _blocks(x_BxLxHxK, block):
  """[B, L, H, K] -> [n, B, H, block, K] (float32)."""
  B, L, H, K = x_BxLxHxK.shape
  return x_BxLxHxK.astype(jnp.float32).reshape(B, L // block, block, H, K).transpose(1, 0, 3, 2, 4)


def _unblocks(x_NxBxHxBqxK, dtype):
  n, B, H, b, K = x_NxBxHxBqxK.shape
  return x_NxBxHxBqxK.transpose(1, 0, 3, 2, 4).reshape(B, n * b, H, K).astype(dtype)


def _segment_blocks(segment_ids_BxL, block):
  """[B, L] -> [n, B, block], or None without segments."""
  if segment_ids_BxL is None:
    return None
  B, L = segment_ids_BxL.shape
  return segment_ids_BxL.reshape(B, L // block, block).transpose(1, 0, 2)


def _scores(q, k, i, j, scale, seg_q=None, seg_k=None):
  """Tile (i, j) of the causal scores, [B, H, bq, bk] float32 (masked on the diagonal tile, and
  across documents when seg_q [B, bq] and seg_k [B, bk] are given)."""
  s = jnp.einsum("bhqk,bhsk->bhqs", q, k) * scale
  b = q.shape[2]
  keep = (j < i) | (jnp.arange(b)[:, None] >= jnp.arange(b)[None, :])
  if seg_q is not None:
    keep = keep & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
  return jnp.where(keep, s, _NEG)


def _forward(q_blocks, k_blocks, v_blocks, seg_blocks, scale):
  """(o [n, B, H, b, K], lse [n, B, H, b]) by an online softmax over the key blocks 0..i."""
  seg = (lambda i: seg_blocks[i]) if seg_blocks is not None else (lambda i: None)

  def query_block(i):
    q = q_blocks[i]

    def step(j, carry):
      m, l, acc = carry
      s = _scores(q, k_blocks[j], i, j, scale, seg(i), seg(j))
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      return (m_new, l * correction + jnp.sum(p, axis=-1),
              acc * correction[..., None] + jnp.einsum("bhqs,bhsk->bhqk", p, v_blocks[j]))

    # Initial carries made *like* q: inside a shard_map (the simulated workers' inner step,
    # `algorithm.over_workers`) they then vary over the same manual axes as the loop's outputs,
    # which fori_loop requires; jnp.zeros(shape) would be replicated and fail to trace.
    m, l, acc = jax.lax.fori_loop(0, i + 1, step, (jnp.full_like(q[..., 0], _NEG),
                                                   jnp.zeros_like(q[..., 0]), jnp.zeros_like(q)))
    return acc / l[..., None], m + jnp.log(l)

  return jax.lax.map(query_block, jnp.arange(q_blocks.shape[0]))


def blockwise_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block: int,
                        segment_ids_BxL: jax.Array | None = None):
  """Causal softmax attention of q, k, v [B, L, H, K] (q unscaled), in tiles of `block`
  positions (block must divide L); with segment_ids [B, L] int, a query sees only the keys of
  its own segment. Equal to the dense softmax attention; see the module docstring for the
  memory."""
  return _blockwise(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, block):
  return _fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, block)[0]


def _fwd(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, block):
  blocks = tuple(_blocks(x, block) for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  o, lse = _forward(*blocks, _segment_blocks(segment_ids_BxL, block),
                    q_BxLxHxK.shape[-1] ** -0.5)
  # Saved: the inputs, the output and the log-sum-exp, O(L·K) each (the tiles are rebuilt).
  return (_unblocks(o, q_BxLxHxK.dtype),
          (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL, o, lse))


def _bwd(block, residuals, do_BxLxHxK):
  q_in, k_in, v_in, segment_ids_BxL, o, lse = residuals
  q_blocks, k_blocks, v_blocks = (_blocks(x, block) for x in (q_in, k_in, v_in))
  seg_blocks = _segment_blocks(segment_ids_BxL, block)
  seg = (lambda i: seg_blocks[i]) if seg_blocks is not None else (lambda i: None)
  n = q_blocks.shape[0]
  scale = q_blocks.shape[-1] ** -0.5
  do = _blocks(do_BxLxHxK, block)
  d = jnp.sum(do * o, axis=-1)   # D_i = Σ_k dO·O, [n, B, H, b]

  def probs_and_ds(i, j):
    s = _scores(q_blocks[i], k_blocks[j], i, j, scale, seg(i), seg(j))
    p = jnp.exp(s - lse[i][..., None])   # masked: exp(min − lse) = 0
    dp = jnp.einsum("bhqk,bhsk->bhqs", do[i], v_blocks[j])
    return p, p * (dp - d[i][..., None])

  def dq_block(i):   # dQ_i = Σ_{j ≤ i} dS_ij K_j · scale
    def step(j, dq):
      _, ds = probs_and_ds(i, j)
      return dq + jnp.einsum("bhqs,bhsk->bhqk", ds, k_blocks[j]) * scale
    return jax.lax.fori_loop(0, i + 1, step, jnp.zeros_like(q_blocks[i]))   # like q: see _forward

  def dkv_block(j):   # dK_j = Σ_{i ≥ j} dS_ijᵀ Q_i · scale, dV_j = Σ_{i ≥ j} P_ijᵀ dO_i
    def step(i, carry):
      dk, dv = carry
      p, ds = probs_and_ds(i, j)
      return (dk + jnp.einsum("bhqs,bhqk->bhsk", ds, q_blocks[i]) * scale,
              dv + jnp.einsum("bhqs,bhqk->bhsk", p, do[i]))
    zeros = jnp.zeros_like(k_blocks[j])
    return jax.lax.fori_loop(j, n, step, (zeros, zeros))

  dq = jax.lax.map(dq_block, jnp.arange(n))
  dk, dv = jax.lax.map(dkv_block, jnp.arange(n))
  # The segment ids are integers: no cotangent (None).
  return (_unblocks(dq, q_in.dtype), _unblocks(dk, k_in.dtype), _unblocks(dv, v_in.dtype),
          None)


_blockwise.defvjp(_fwd, _bwd)
