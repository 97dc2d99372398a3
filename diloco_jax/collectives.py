"""The worker all-reduce of outer gradients, quantized, and the bits it puts on the wire.

Each worker's *unreduced* fragment outer gradient Δ_m is quantized leaf by leaf, each device
quantizing its own shard (blocks of B consecutive values of the flattened leaf, never across two
devices); the mean over workers is accumulated in fp32 (SPEC §3: a low-precision psum would
accumulate in the low dtype). Only the WORKER axis is crossed. Two modes behind one signature:

* ``reference``: quantize → dequantize → fp32 psum over the worker axis, divided by M. The
  numerics reference; what moves is fp32.
* ``packed``: each worker encodes its Δ_m, the packed payload
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

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from diloco_jax import mesh as mesh_lib, sharding
from diloco_jax.quantize import Codec

WIRES = ("reference", "packed")


def ring_allreduce_bits(n: int, bits: int, num_workers: int) -> int:
  """Bits one worker sends in a bandwidth-optimal ring all-reduce of n values of `bits` bits."""
  return 2 * (num_workers - 1) * n * bits // num_workers


def bits_per_worker(shapes: Sequence[Sequence[int]], codec: Codec, num_workers: int,
                    wire: str = "reference", specs: Sequence[P] | None = None,
                    mesh: Mesh | None = None) -> int:
  """Bits one worker sends to all-reduce the outer gradients of leaves of these shapes (see the
  module doc), summed over the worker's devices: each device sends its own shard of each leaf
  (`specs` on `mesh`; default: unsharded). A leaf replicated over some of a worker's devices is
  sent by every copy: that is what the collective moves (the norm scales, a few KiB)."""
  total = 0
  specs = [P()] * len(shapes) if specs is None else specs
  for shape, spec in zip(shapes, specs, strict=True):
    local = math.prod(shape if mesh is None else sharding.local_shape(shape, spec, mesh))
    devices = 1 if mesh is None else mesh_lib.devices_per_worker(mesh)
    if codec.name == "fp32" and wire == "reference":
      total += devices * ring_allreduce_bits(local, 32, num_workers)
    else:
      # payload_bits counts the arrays encode really returns (padding to whole blocks included),
      # so this equals what the packed all-gather moves; SPEC's n·bits + (n/B)·32 when B | n.
      total += devices * (num_workers - 1) * codec.payload_bits(local)
  return total


def check_blocks(params, specs, mesh: Mesh, codec: Codec) -> None:
  """Quantization blocks must not straddle shard boundaries, so that every device quantizes its
  own shard and the blocks (B consecutive values of the flattened leaf) are the same on every
  mesh. A device's shard is a set of contiguous runs of the flattened leaf, each as long as the
  innermost sharded dimension's shard times the dimensions after it: B must divide that.
  `params` (arrays or shapes) and `specs` (a PartitionSpec per leaf) are trees alike."""
  if codec.name in ("fp32", "bf16"):   # no blocks
    return
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, leaf), spec in zip(paths, jax.tree.leaves(specs, is_leaf=sharding.is_spec),
                                strict=True):
    shape, name = tuple(leaf.shape), jax.tree_util.keystr(path)
    local = sharding.local_shape(shape, spec, mesh)
    split = [i for i, (n, k) in enumerate(zip(shape, local)) if n != k]
    if not split:
      continue
    run = local[split[-1]] * math.prod(shape[split[-1] + 1:])
    if run % codec.block_size:
      raise ValueError(
          f"diloco.codec_block_size={codec.block_size} must divide the runs of {run} values "
          f"that each device holds of {name} {tuple(shape)} under {spec} on this mesh, so that "
          f"no quantization block straddles two devices; use a block size dividing {run}")


def worker_mean(delta_leaves: list, codec: Codec, mesh: Mesh, *, wire: str = "reference",
                rng: jax.Array | None = None, specs: Sequence[P] | None = None,
                count: jax.Array | None = None):
  """Mean over workers of Q(Δ_m), accumulated in fp32, leaf by leaf and shard by shard.

  One `shard_map` over the whole mesh: each device quantizes its own shard of each leaf (the
  blocks are B consecutive values of the flattened leaf and never straddle two devices, see
  `check_blocks`), and only the WORKER axis is crossed: the reference wire psums the dequantized
  values in fp32, the packed wire all-gathers the packed payload and sums the decoded values in
  fp32. Nothing gathers a leaf, let alone a fragment, onto one device.

  Args:
    delta_leaves: list of fp32 [M, ...] arrays (one fragment's outer gradients, per worker).
    codec: the quantizer; fp32 is the identity and sends the values unchanged.
    mesh: the mesh whose WORKER axis carries the workers.
    wire: "reference" or "packed" (module docstring).
    rng: a key for stochastic rounding, or None. Worker m, leaf i and shard s use
      fold_in(fold_in(split(rng, M)[m], i), s): independent per worker, identical on the
      devices that hold copies of the same shard.
    specs: each leaf's PartitionSpec without the worker axis (default: unsharded).
    count: the number of workers in the mean (a scalar; default M): a sync that some workers
      missed divides the sum by those that reported, whose Δ the caller has zeroed (Q(0) = 0).
  Returns:
    (mean leaves without the worker dim, the values each worker sent [M, ...] after
    quantization, each worker's ‖Q(Δ_m)‖² [M]).
  """
  if wire not in WIRES:
    raise ValueError(f"diloco.wire must be one of {WIRES}, got {wire!r}")
  M = delta_leaves[0].shape[0]
  specs = [P()] * len(delta_leaves) if specs is None else list(specs)
  keys = None if rng is None else jax.random.split(rng, M)
  divisor = M if count is None else jnp.maximum(count.astype(jnp.float32), 1.0)
  leaf_specs = [sharding.per_worker(s) for s in specs]

  def per_shard(deltas, keys_m):
    sent, mean = [], []
    for i, (d, spec) in enumerate(zip(deltas, specs)):
      m = d.shape[0]   # workers on this device (M / the worker axis size)
      flat = d.reshape(m, -1).astype(jnp.float32)
      k = None if keys_m is None else jax.vmap(
          lambda key: jax.random.fold_in(jax.random.fold_in(key, i), _shard_index(spec, mesh))
      )(keys_m)
      if wire == "reference":
        s = jax.vmap(codec.roundtrip)(flat) if k is None else jax.vmap(codec.roundtrip)(flat, k)
        mu = jax.lax.psum(jnp.sum(s, axis=0), mesh_lib.WORKER) / divisor
      else:
        enc = jax.vmap(codec.encode)(flat) if k is None else jax.vmap(codec.encode)(flat, k)
        # What crosses the worker axis: the packed payload and the per-block scales only.
        gathered = jax.tree.map(
            lambda a: jax.lax.all_gather(a, mesh_lib.WORKER, axis=0, tiled=True), enc)
        decode = jax.vmap(lambda e: codec.decode(e, (flat.shape[1],)))
        s, mu = decode(enc), jnp.sum(decode(gathered), axis=0) / divisor
      sent.append(s.reshape(d.shape))
      mean.append(mu.reshape(d.shape[1:]))
    return mean, sent

  fn = jax.shard_map(per_shard, mesh=mesh,
                     in_specs=(leaf_specs, None if keys is None else P(mesh_lib.WORKER)),
                     out_specs=(list(specs), leaf_specs), check_vma=False)
  mean, sent = fn(list(delta_leaves), keys)
  sq_norms = sum(jnp.sum(jnp.square(s), axis=tuple(range(1, s.ndim))) for s in sent)
  return mean, sent, sq_norms


def _shard_index(spec: P, mesh: Mesh) -> jax.Array:
  """The index of this device's shard of a leaf with `spec` (0 on every copy of a replicated
  one), inside a shard_map over `mesh`."""
  index = jnp.int32(0)
  for axes in spec:
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None:
        index = index * mesh_lib.axis_size(mesh, a) + jax.lax.axis_index(a)
  return index


def relative_error(delta_leaves: list, sent_leaves: list) -> jax.Array:
  """‖Δ − Q(Δ)‖ / ‖Δ‖ over the whole fragment and all workers (the quantizer's error)."""
  num = sum(jnp.sum(jnp.square(d - s)) for d, s in zip(delta_leaves, sent_leaves))
  den = sum(jnp.sum(jnp.square(d)) for d in delta_leaves)
  return jnp.sqrt(num / jnp.maximum(den, 1e-30))
