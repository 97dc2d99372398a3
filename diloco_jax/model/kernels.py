"""The library attention kernels behind `model.attention` (SPEC §6.2): cuDNN's fused attention
on GPU (`jax.nn.dot_product_attention`) and the Pallas splash attention on TPU. Both take the
same q, k, v [B, L, H, K] (q unscaled) and segment ids [B, L] as `dense_attention`, and compute
the same causal, document-masked softmax attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cudnn_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL=None, *,
                    implementation: str = "cudnn"):
  """cuDNN flash attention (causal). With segment ids the document mask goes in as a boolean
  [B, 1, L, L] `mask` (cuDNN's own packed-segment form needs per-row offsets and a static
  maximum segment count, which packing does not give); without, nothing of size [L, L] exists.
  `implementation="xla"` runs the same call through XLA's reference, which is what CPU tests
  compare against the dense attention."""
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    # Fails here, before tracing reaches XLA, instead of deep inside the lowering.
    raise ValueError(f"model.attention='cudnn' needs a GPU, this process has "
                     f"{jax.default_backend()}")
  mask = None
  if segment_ids_BxL is not None:
    mask = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask,
                                      is_causal=True, implementation=implementation)


def splash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, segment_ids_BxL=None, block: int = 128):
  """Splash attention with a causal mask (its tiles above the diagonal are skipped by the
  kernel's block-sparse mask info) and segment ids, in tiles of `block` (must divide L; a TPU
  wants a multiple of 128). Off TPU it runs the kernel in Pallas' interpreter: the same
  numerics, slowly, which is what lets CPU tests check it."""
  # Imported here: Pallas' TPU ops are a heavy import that only this path needs.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  _, L, H, K = q_BxLxHxK.shape
  mask = splash.MultiHeadMask([splash.CausalMask((L, L)) for _ in range(H)])
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha_single_device(mask, block_sizes=sizes,
                                                interpret=jax.default_backend() != "tpu")
  # The kernel works on one example, heads first [H, L, K], and does not scale the logits.
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  q, k, v = heads_first(q_BxLxHxK * K**-0.5), heads_first(k_BxLxHxK), heads_first(v_BxLxHxK)
  if segment_ids_BxL is None:
    o_BxHxLxK = jax.vmap(kernel)(q, k, v)
  else:
    segments = splash.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
    o_BxHxLxK = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, segments)
  return heads_first(o_BxHxLxK).astype(q_BxLxHxK.dtype)
