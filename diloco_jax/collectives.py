"""The worker all-reduce of outer gradients, quantized, and the bits it puts on the wire.

Each worker's *unreduced* fragment outer gradient Δ_m is quantized; the mean over workers is
accumulated in fp32 (SPEC §3: a low-precision psum would accumulate in the low dtype). Two modes
behind one signature:

* ``reference``: quantize → dequantize → fp32 mean over the worker axis (XLA lowers the mean of a
  WORKER-sharded array to an fp32 all-reduce). The numerics reference; what moves is fp32.
* ``packed``: a `shard_map` over WORKER in which each worker encodes its Δ_m, the packed payload
  (two 4-bit codes per byte, plus the per-block fp32 scales) is all-gathered over WORKER, and every
  worker decodes all M payloads and sums them in fp32. What crosses the worker axis is the low-bit
  dtype. The same numbers as ``reference``, except that where a decoded value code × scale is not
  exact in fp32 (fp8, E2M1), XLA may fuse that multiply into the sum as an FMA in one program and
  not in the other: the means then differ by at most one ulp (tested). E3M0 and bf16 decode
  exactly and agree bit for bit.

Bits sent per worker (the convention, also in docs/design.md): an fp32 codec is a ring all-reduce,
2(M−1)/M · n · 32 bits; a quantized codec is the all-gather of the packed payload, (M−1) · payload_bits(n)
(every worker forwards the M−1 payloads it does not own around the ring). For M = 2 both equal
one payload. A reduce-scatter variant (2(M−1)/M) would send less for M > 2 but must re-quantize the
mean, which changes the numerics; we keep the exact fp32 mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from diloco_jax import mesh as mesh_lib
from diloco_jax.quantize import Codec

WIRES = ("reference", "packed")


def ring_allreduce_bits(n: int, bits: int, num_workers: int) -> int:
  """Bits one worker sends in a bandwidth-optimal ring all-reduce of n values of `bits` bits."""
  return 2 * (num_workers - 1) * n * bits // num_workers


def bits_per_worker(n: int, codec: Codec, num_workers: int, wire: str = "reference") -> int:
  """Bits one worker sends to all-reduce an n-value outer gradient with `codec` (see module doc):
  fp32 on the reference wire is a ring all-reduce; everything else is the packed all-gather."""
  if codec.name == "fp32" and wire == "reference":
    return ring_allreduce_bits(n, 32, num_workers)
  # payload_bits counts the arrays encode really returns (padding to whole blocks included),
  # so this equals what the packed all-gather moves; SPEC's n·bits + (n/B)·32 when B divides n.
  return (num_workers - 1) * codec.payload_bits(n)


def _flatten(leaves: list) -> jax.Array:
  """[M, ...] leaves -> one [M, n] fp32 matrix (a fragment is quantized as one vector)."""
  return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves], axis=1)


def _unflatten(flat_Mxn: jax.Array, like: list) -> list:
  out, start = [], 0
  for x in like:
    size = x[0].size
    out.append(flat_Mxn[:, start:start + size].reshape((flat_Mxn.shape[0],) + x.shape[1:]))
    start += size
  return out


def _roundtrip_per_worker(codec: Codec, flat_Mxn: jax.Array, rng):
  if rng is None:
    return jax.vmap(codec.roundtrip)(flat_Mxn)
  keys = jax.random.split(rng, flat_Mxn.shape[0])
  return jax.vmap(codec.roundtrip)(flat_Mxn, keys)


def worker_mean(delta_leaves: list, codec: Codec, mesh: Mesh, *, wire: str = "reference",
                rng: jax.Array | None = None):
  """Mean over workers of Q(Δ_m), accumulated in fp32.

  Args:
    delta_leaves: list of fp32 [M, ...] arrays (one fragment's outer gradients, per worker).
    codec: the quantizer; fp32 is the identity and sends the values unchanged.
    mesh: the mesh whose WORKER axis carries the workers.
    wire: "reference" or "packed" (module docstring).
    rng: a key for stochastic rounding (one sub-key per worker), or None.
  Returns:
    (mean leaves without the worker dim, the values each worker sent [M, ...] after
    quantization, each worker's ‖Q(Δ_m)‖² [M]). The squared norms are computed where the
    worker's values live; only M scalars cross workers for them.
  """
  flat = _flatten(delta_leaves)
  if wire == "reference":
    sent = _roundtrip_per_worker(codec, flat, rng)
    mean = jnp.mean(sent, axis=0, keepdims=True)
  elif wire == "packed":
    sent, mean = _packed_gather_mean(codec, flat, mesh, rng)
  else:
    raise ValueError(f"diloco.wire must be one of {WIRES}, got {wire!r}")
  sq_norms = jnp.sum(jnp.square(sent), axis=1)
  mean = _unflatten(mean, delta_leaves)
  return [m[0] for m in mean], _unflatten(sent, delta_leaves), sq_norms


def _packed_gather_mean(codec: Codec, flat_Mxn: jax.Array, mesh: Mesh, rng):
  """Encode per worker, all-gather the packed payload over WORKER, decode and sum in fp32."""
  M, n = flat_Mxn.shape
  keys = None if rng is None else jax.random.split(rng, M)

  def per_shard(x_mxn, keys_m):
    enc = jax.vmap(codec.encode)(x_mxn) if keys_m is None else jax.vmap(codec.encode)(x_mxn, keys_m)
    # What crosses the worker axis: the packed payload and the per-block scales, nothing else.
    gathered = jax.tree.map(
        lambda a: jax.lax.all_gather(a, mesh_lib.WORKER, axis=0, tiled=True), enc)
    decode = jax.vmap(lambda e: codec.decode(e, (n,)))
    return decode(enc), jnp.mean(decode(gathered), axis=0, keepdims=True)

  in_specs = (P(mesh_lib.WORKER), None if keys is None else P(mesh_lib.WORKER))
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs,
                     out_specs=(P(mesh_lib.WORKER), P()), check_vma=False)
  return fn(flat_Mxn, keys)


def relative_error(delta_leaves: list, sent_leaves: list) -> jax.Array:
  """‖Δ − Q(Δ)‖ / ‖Δ‖ over the whole fragment and all workers (the quantizer's error)."""
  num = sum(jnp.sum(jnp.square(d - s)) for d, s in zip(delta_leaves, sent_leaves))
  den = sum(jnp.sum(jnp.square(d)) for d in delta_leaves)
  return jnp.sqrt(num / jnp.maximum(den, 1e-30))
