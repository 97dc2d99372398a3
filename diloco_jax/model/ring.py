"""Ring attention: causal softmax attention with the sequence sharded over the `context` axis
(context parallelism, SPEC §6.2).

Each of the n devices of the context ring holds Lc = L / n positions of q, k and v. The keys and
values (with the original sequence index and the segment id of every position) travel around the
ring with `jax.lax.ppermute`, one hop per step; after n steps every query block has met every key
block, and nothing larger than one [Lc, Lc] tile of scores per head ever exists.

Online softmax. For one query, after the key blocks seen so far, keep the running max m, the
running sum l = Σ_j exp(s_j − m) and the unnormalised output a = Σ_j exp(s_j − m) v_j (float32).
A new block with scores s_j (masked keys excluded) merges as

    m' = max(m, max_j s_j),   c = exp(m − m'),
    l' = c·l + Σ_j exp(s_j − m'),   a' = c·a + Σ_j exp(s_j − m') v_j,

and after the last block o = a / l, which is exactly softmax(s)·v whatever order the blocks came
in (every term carries the same factor exp(−m_final)). The mask: key j is visible to query i iff
index_j <= index_i and segment_j == segment_i, with the indices the ORIGINAL sequence positions,
so any layout of the sequence over the ring (natural or load-balanced) gives the same result.
A masked probability is set to 0 (not exp(min − m)), so a block with no visible key for a row
changes nothing; every row sees at least its own position, so l > 0 at the end.

Backward (a custom_vjp, FlashAttention-2's form): with lse = m + log l and D_i = Σ_k dO_ik·O_ik
saved per query, a second trip around the ring recomputes P = exp(s − lse) tile by tile,
dS = P ⊙ (dO·Vᵀ − D), adds dS·K to dQ locally and dSᵀ·Q, Pᵀ·dO to dK, dV, which travel with
their K, V block and take one last hop home. Residuals are O(Lc) per device; plain autodiff
through the loop would instead keep all n score tiles, [Lc, L] per head.

Load balancing. Under a causal mask, a device holding the end of the sequence has L/n·L/n·(n−½)
useful scores and the first one only ½·(L/n)²: a ring is only as fast as its busiest device
each step. `load_balance_permutation` cuts the sequence into 2n chunks and gives device i the
chunks i and 2n−1−i (one early, one late; MaxText's dual-chunk swap). With chunk size c, at
every step device i meets device j's block {j, 2n−1−j}: for j < i both its query chunks see key
chunk j fully and key chunk 2n−1−j not at all; for j > i its late chunk sees both key chunks
fully and its early chunk neither; for j = i the two diagonal chunks are half visible and the
late-queries-early-keys chunk fully. In every case exactly 2c² of the (2c)² scores are useful,
on every device at every step. (This body computes every tile, masked or not, so its time
does not depend on the layout; the balance is what a per-step kernel that skips masked tiles
turns into speed.)

The worker axis is manual too (`ring_attention` maps over every mesh axis): the algorithms vmap
over workers with `spmd_axis_name=worker`, which puts each worker's slice on its own devices
and keeps every collective-permute inside one worker's context group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from diloco_jax.mesh import CONTEXT, DATA, EXPERT, MODEL, axis_size

_NEG = jnp.finfo(jnp.float32).min


# ------------------------------------------------------------------------------- permutation
def load_balance_permutation(L: int, n: int) -> np.ndarray:
  """The causal load-balancing layout of a length-L sequence over n context shards.

  Returns perm [L] int32 with `x_laid = x[:, perm]`: laid-out position p holds original position
  perm[p]. The sequence is cut into 2n chunks of L / (2n); shard i (laid positions
  i·L/n .. (i+1)·L/n − 1) holds chunk i then chunk 2n−1−i. E.g. L = 8, n = 2 (chunks of 2):
  [0, 1, 6, 7 | 2, 3, 4, 5]. Feed `perm` (broadcast to [B, L]) as `seq_index`.
  """
  if n < 1 or L % (2 * n):
    raise ValueError(f"load balancing over {n} context shards cuts the sequence into 2*{n} = "
                     f"{2 * n} chunks, so the sequence length must be a multiple of {2 * n}, "
                     f"got {L}")
  chunks = np.arange(L, dtype=np.int32).reshape(2 * n, L // (2 * n))
  order = [c for i in range(n) for c in (i, 2 * n - 1 - i)]
  return chunks[order].reshape(L)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """inv with `x_laid[:, inv] == x` when `x_laid = x[:, perm]`."""
  return np.argsort(perm).astype(np.int32)


# --------------------------------------------------------------------------- per-device body
def _ring(axis_name):
  """The one-hop shift: shard j sends to shard j + 1 (mod n)."""
  n = jax.lax.axis_size(axis_name)
  return lambda tree: jax.tree.map(
      lambda x: jax.lax.ppermute(x, axis_name, [(j, (j + 1) % n) for j in range(n)]), tree)


def _visible(q_index, k_index, q_segment, k_segment):
  """[B, 1, Lq, Lk] bool: causal in the original positions, and within one document."""
  keep = (k_index[:, None, :] <= q_index[:, :, None]) & (
      k_segment[:, None, :] == q_segment[:, :, None])
  return keep[:, None]


def _scores(qs_BxLxHxK, k_BxLxHxK):
  """[B, H, Lq, Lk] float32 from the pre-scaled queries."""
  return jnp.einsum("bqhk,bshk->bhqs", qs_BxLxHxK, k_BxLxHxK.astype(jnp.float32))


def _forward(q, k, v, q_index, k_index, q_segment, k_segment, axis_name):
  """(o [B, Lc, H, K] float32, lse [B, H, Lc]) by the online softmax around the ring."""
  qs = q.astype(jnp.float32) * q.shape[-1] ** -0.5
  shift = _ring(axis_name)

  def merge(stats, block):
    m, l, acc = stats
    k, v, k_index, k_segment = block
    keep = _visible(q_index, k_index, q_segment, k_segment)
    s = jnp.where(keep, _scores(qs, k), _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(keep, jnp.exp(s - m_new[..., None]), 0.0)
    c = jnp.exp(m - m_new)
    return (m_new, c * l + jnp.sum(p, axis=-1),
            c[..., None] * acc + jnp.einsum("bhqs,bshk->bhqk", p, v.astype(jnp.float32)))

  B, Lc, H, K = q.shape
  init = (jnp.full((B, H, Lc), _NEG), jnp.zeros((B, H, Lc)), jnp.zeros((B, H, Lc, K)))
  block = (k, v, k_index, k_segment)
  # Each hop depends only on the block just received, not on its merge, so XLA can send block
  # j + 1 onward while merging block j; n − 1 hops in all. A Python loop (n is the context
  # size, a handful), not a scan or fori_loop: in JAX 0.10.2 a scan whose body reduces (max,
  # sum) inside shard_map under vmap(spmd_axis_name=worker) fails the manual-axes type check
  # ("Scan carry input and output got mismatched varying manual axes"). Unrolled, nothing
  # needs a pcast either.
  stats = merge(init, block)
  for _ in range(1, jax.lax.axis_size(axis_name)):
    block = shift(block)
    stats = merge(stats, block)
  m, l, acc = stats
  l = jnp.where(l == 0, 1.0, l)   # a row with no visible key (not reachable causally): o = 0
  o = (acc / l[..., None]).transpose(0, 2, 1, 3)
  return o, m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def ring_attention_shard(q, k, v, q_index, k_index, q_segment, k_segment, axis_name):
  """Causal softmax attention of this shard's queries over the keys of the whole ring, inside
  shard_map (local view).

  q, k, v [B, Lc, H, K] (q unscaled; scale K^-0.5); q_index, k_index [B, Lc] int32: each local
  position's original sequence index; q_segment, k_segment [B, Lc] int32: document ids. Key j is
  visible to query i iff k_index_j <= q_index_i and k_segment_j == q_segment_i. K, V and their
  index and segment arrays travel around `axis_name`. Returns o [B, Lc, H, K] in q's dtype.
  """
  o, _ = _forward(q, k, v, q_index, k_index, q_segment, k_segment, axis_name)
  return o.astype(q.dtype)


def _fwd(q, k, v, q_index, k_index, q_segment, k_segment, axis_name):
  o, lse = _forward(q, k, v, q_index, k_index, q_segment, k_segment, axis_name)
  return o.astype(q.dtype), (q, k, v, q_index, k_index, q_segment, k_segment, o, lse)


def _bwd(axis_name, residuals, do_BxLxHxK):
  q, k, v, q_index, k_index, q_segment, k_segment, o, lse = residuals
  scale = q.shape[-1] ** -0.5
  qs = q.astype(jnp.float32) * scale
  do = do_BxLxHxK.astype(jnp.float32)
  d = jnp.einsum("bqhk,bqhk->bhq", do, o)   # D_i = Σ_k dO·O
  shift = _ring(axis_name)

  def grads(block):
    """This block's (dQ, dK, dV) contributions, float32."""
    k, v, k_index, k_segment = block
    keep = _visible(q_index, k_index, q_segment, k_segment)
    p = jnp.where(keep, jnp.exp(_scores(qs, k) - lse[..., None]), 0.0)
    dp = jnp.einsum("bqhk,bshk->bhqs", do, v.astype(jnp.float32))
    ds = p * (dp - d[..., None])
    return (jnp.einsum("bhqs,bshk->bqhk", ds, k.astype(jnp.float32)) * scale,
            jnp.einsum("bhqs,bqhk->bshk", ds, qs),
            jnp.einsum("bhqs,bqhk->bshk", p, do))

  block = (k, v, k_index, k_segment)
  dq, dk, dv = grads(block)   # the local block; unrolled for the reason in _forward
  # dK, dV ride with their block; after n − 1 hops the block sits one device before its home.
  n = jax.lax.axis_size(axis_name)
  for _ in range(1, n):
    block, dk, dv = shift((block, dk, dv))
    dq_j, dk_j, dv_j = grads(block)
    dq, dk, dv = dq + dq_j, dk + dk_j, dv + dv_j
  if n > 1:
    dk, dv = shift((dk, dv))   # the last hop home
  # Indices and segment ids are integers: no cotangent.
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


ring_attention_shard.defvjp(_fwd, _bwd)


# ------------------------------------------------------------------------------- global view
def _batch_axes(mesh: Mesh, B: int):
  """(data, expert) where > 1 and together dividing B (as the activation rules shard `batch`);
  else None: the batch is then replicated and every device of those axes computes it all."""
  axes = tuple(a for a in (DATA, EXPERT) if axis_size(mesh, a) > 1)
  if not axes or B % math.prod(axis_size(mesh, a) for a in axes):
    return None
  return axes[0] if len(axes) == 1 else axes


def ring_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, seq_index_BxL: jax.Array | None,
                   segment_ids_BxL: jax.Array | None, mesh: Mesh) -> jax.Array:
  """Causal softmax attention of q, k, v [B, L, H, K] (q unscaled) with the sequence sharded over
  the mesh's `context` axis (global view; call it under jit, or under the algorithms' vmap over
  workers with spmd_axis_name=worker).

  The sequence may be in any layout (e.g. permuted by `load_balance_permutation` at the model
  input): seq_index [B, L] int gives each position's original index (None: natural order 0..L−1);
  segment_ids [B, L] int the document ids (None: one document). The batch is split over
  (data, expert) where they divide it, the sequence over `context` (which must divide L), the
  heads over `model` where it divides H; every mesh axis, the worker axis included, is manual.
  Returns o [B, L, H, K] in q's dtype, in the same layout as q.
  """
  B, L, H, _ = q_BxLxHxK.shape
  n = axis_size(mesh, CONTEXT)
  if L % n:
    raise ValueError(f"ring attention splits the sequence over mesh.context={n}, which does "
                     f"not divide the sequence length {L}")
  if seq_index_BxL is None:
    seq_index_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  if segment_ids_BxL is None:
    segment_ids_BxL = jnp.zeros((B, L), jnp.int32)
  seq_index_BxL = jnp.asarray(seq_index_BxL, jnp.int32)
  segment_ids_BxL = jnp.asarray(segment_ids_BxL, jnp.int32)
  batch = _batch_axes(mesh, B)
  heads = MODEL if axis_size(mesh, MODEL) > 1 and H % axis_size(mesh, MODEL) == 0 else None
  x_spec, ids_spec = P(batch, CONTEXT, heads, None), P(batch, CONTEXT)

  def local(q, k, v, index, segment):
    # Self-attention: the local keys start at the same positions as the local queries.
    return ring_attention_shard(q, k, v, index, index, segment, segment, CONTEXT)

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(x_spec, x_spec, x_spec, ids_spec, ids_spec),
                       out_specs=x_spec)(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, seq_index_BxL,
                                         segment_ids_BxL)
