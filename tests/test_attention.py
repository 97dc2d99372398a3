"""The attention implementations against the dense reference: blockwise (flash-style) tiles,
the cuDNN wrapper (through XLA on CPU) and splash (interpreted on CPU), forward and gradient, to
1e-5, with and without document packing (segment ids, positions restarting per document); the
whole model's packing semantics; config errors are one sentence naming the key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import config as config_lib, model
from diloco_jax.model import attention as attention_lib, kernels
from diloco_jax.model.blockwise import blockwise_attention
from tests import overrides as overrides_lib
from tests.test_train import small_config

B, L, H, K = 2, 16, 2, 8
# Two rows of packed documents: boundaries inside a 4-tile and across tiles, one document
# spanning several tiles, and trailing padding (segment 0).
SEGMENTS_BxL = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4],
                          [1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0]], jnp.int32)


def dense_attention(q, k, v, segment_ids=None):
  """The slow obvious reference: every score, a causal (and document) mask, a softmax."""
  n = q.shape[1]
  keep = jnp.tril(jnp.ones((n, n), bool))
  if segment_ids is not None:
    keep = keep & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  s = jnp.einsum("bqhk,bshk->bhqs", q, k) * q.shape[-1]**-0.5
  s = jnp.where(keep, s, -jnp.inf)
  return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, axis=-1), v)


def qkv_and_cotangent(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  # 3x: a peaked softmax, where a wrong mask or a lost rescaling shows.
  return [3.0 * jax.random.normal(kk, shape) for kk in keys[:3]], jax.random.normal(keys[3], shape)


def assert_same_forward_and_gradient(fast, reference, q, k, v, cot, tol=1e-5):
  np.testing.assert_allclose(jax.jit(fast)(q, k, v), reference(q, k, v), rtol=tol, atol=tol)
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot),
                                    argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grad(fast), grad(reference), strict=True):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("segments", [None, SEGMENTS_BxL], ids=["one-document", "packed"])
@pytest.mark.parametrize("block", [4, 16])   # 4 tiles per row (diagonal skipping) and one tile
def test_blockwise_equals_dense_forward_and_gradient(block, segments):
  (q, k, v), cot = qkv_and_cotangent((B, L, H, K))
  assert_same_forward_and_gradient(lambda q, k, v: blockwise_attention(q, k, v, block, segments),
                                   lambda q, k, v: dense_attention(q, k, v, segments),
                                   q, k, v, cot)


def test_the_models_dense_attention_equals_the_reference():
  (q, k, v), cot = qkv_and_cotangent((B, L, H, K))
  for segments in (None, SEGMENTS_BxL):
    assert_same_forward_and_gradient(
        lambda q, k, v: attention_lib.dense_attention(q, k, v, segments),
        lambda q, k, v: dense_attention(q, k, v, segments), q, k, v, cot)


def test_the_cudnn_call_equals_dense_through_xla():
  """The same jax.nn.dot_product_attention call with XLA's implementation: the argument
  layout, the scale, the causal flag and the document mask are right (the kernel itself needs
  a GPU)."""
  (q, k, v), cot = qkv_and_cotangent((B, L, H, K))
  for segments in (None, SEGMENTS_BxL):
    assert_same_forward_and_gradient(
        lambda q, k, v: kernels.cudnn_attention(q, k, v, segments, implementation="xla"),
        lambda q, k, v: dense_attention(q, k, v, segments), q, k, v, cot)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the error is for a non-GPU process")
def test_cudnn_without_a_gpu_is_one_sentence():
  cfg = model.config_from_preset("tiny", num_layers=1, vocab_size=32, attention="cudnn",
                                 dtype="bfloat16")
  params = model.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError) as error:   # raised while tracing: nothing is compiled
    jax.jit(lambda p, t: model.apply(cfg, p, t))(params, jnp.zeros((1, 8), jnp.int32))
  # (jit appends a note on filtered frames after the first line.)
  assert str(error.value).splitlines()[0] == (f"model.attention='cudnn' needs a GPU, this "
                                              f"process has {jax.default_backend()}")


def test_splash_equals_dense_forward_and_gradient():
  """The Pallas TPU kernel (interpreted off TPU; its tiles must be multiples of 128, hence
  L = 256: two tiles, a boundary inside each and a document across them)."""
  (q, k, v), cot = qkv_and_cotangent((1, 256, 1, K), seed=1)
  segments = jnp.array([[1] * 50 + [2] * 150 + [3] * 56], jnp.int32)
  assert_same_forward_and_gradient(
      lambda q, k, v: kernels.splash_attention(q, k, v, segments, 128),
      lambda q, k, v: dense_attention(q, k, v, segments), q, k, v, cot)


def test_a_key_never_reaches_an_earlier_query():
  """Causality across tiles: changing the last tile's keys and values leaves every earlier
  query's output exactly as it was."""
  q, k, v = (jax.random.normal(kk, (B, L, H, K)) for kk in jax.random.split(jax.random.key(1), 3))
  a = blockwise_attention(q, k, v, 4)
  b = blockwise_attention(q, k.at[:, 12:].add(5.0), v.at[:, 12:].add(5.0), 4)
  np.testing.assert_array_equal(a[:, :12], b[:, :12])
  assert np.abs(np.asarray(a[:, 12:] - b[:, 12:])).max() > 1e-3


def test_the_model_with_blockwise_attention_equals_dense():
  dense = model.config_from_preset("tiny", num_layers=2, vocab_size=32)
  blockwise = dataclasses.replace(dense, attention="blockwise", attention_block=4)
  params = model.init_params(dense, jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 32)
  grad = lambda c: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(c, p, batch)[0]))(params)
  (l0, g0), (l1, g1) = grad(dense), grad(blockwise)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("devices", [2, 1])
def test_blockwise_inside_the_workers_lift_equals_dense(devices):
  """The simulated workers' gradient lift (`algorithm.worker_grads`: a shard_map over the worker
  axis, one worker per device unbatched or, on one device, both one after another) with
  blockwise attention: it traces (the tile loops' carries must vary over the worker axis like
  their outputs; they did not, and every long-context run stopped before its first step) and
  gives dense attention's losses and gradients, worker by worker."""
  from diloco_jax import algorithm, mesh as mesh_lib  # noqa: PLC0415
  M = 2
  dense = model.config_from_preset("tiny", num_layers=1, vocab_size=32)
  blockwise = dataclasses.replace(dense, attention="blockwise", attention_block=4)
  mesh = mesh_lib.make_mesh(M, devices=jax.devices()[:devices])
  params = jax.tree.map(lambda x: jnp.stack([x, x * 0.9]), model.init_params(dense,
                                                                             jax.random.key(0)))
  batch = jax.random.randint(jax.random.key(1), (M, 2, 17), 0, 32)

  def grads(cfg):
    return jax.jit(algorithm.worker_grads(lambda p, b: model.loss_fn(cfg, p, b), mesh, M))(
        params, batch)

  ((l0, _), g0), ((l1, _), g1) = grads(dense), grads(blockwise)
  assert l1.shape == (M,) and abs(float(l1[0] - l1[1])) > 1e-4   # two different workers
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- document packing through the whole model -------------------------------------------------

PACKING = model.config_from_preset("tiny", num_layers=1, vocab_size=32)
A_LEN, B_LEN = 6, 10   # document A then document B in one row of 16 (B crosses 4-tiles)


def packed_inputs(seed=2):
  tokens = jax.random.randint(jax.random.key(seed), (2, A_LEN + B_LEN), 0, 32, jnp.int32)
  segments = jnp.broadcast_to(jnp.array([1] * A_LEN + [2] * B_LEN, jnp.int32), tokens.shape)
  positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(A_LEN), jnp.arange(B_LEN)]),
                               tokens.shape).astype(jnp.int32)
  return tokens, positions, segments


VARIANTS = [("dense", "none"), ("blockwise", "none"), ("blockwise", "block")]


def variant(attention, remat):
  return dataclasses.replace(PACKING, attention=attention, attention_block=4, remat=remat)


@pytest.mark.parametrize("attention,remat", VARIANTS)
def test_a_packed_row_equals_each_document_run_alone(attention, remat):
  """Packed with restarting positions, each document gives exactly the logits it gives alone."""
  params = model.init_params(PACKING, jax.random.key(0))
  tokens, positions, segments = packed_inputs()
  packed = jax.jit(lambda p, t, pos, seg: model.apply(variant(attention, remat), p, t,
                                                      positions=pos, segment_ids=seg)[0])
  alone = jax.jit(lambda p, t: model.apply(PACKING, p, t)[0])
  logits = packed(params, tokens, positions, segments)
  np.testing.assert_allclose(logits[:, :A_LEN], alone(params, tokens[:, :A_LEN]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, A_LEN:], alone(params, tokens[:, A_LEN:]),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,remat", VARIANTS[:2])
def test_no_attention_across_a_document_boundary(attention, remat):
  """Rewriting document A leaves document B's outputs as they were; without the segment ids
  (the control) the same rewrite reaches B."""
  cfg = variant(attention, remat)
  params = model.init_params(cfg, jax.random.key(0))
  tokens, positions, segments = packed_inputs()
  other = tokens.at[:, :A_LEN].set((tokens[:, :A_LEN] + 7) % 32)
  run = jax.jit(lambda t, seg: model.apply(cfg, params, t, positions=positions,
                                           segment_ids=seg)[0][:, A_LEN:])
  np.testing.assert_allclose(run(other, segments), run(tokens, segments), rtol=0, atol=1e-6)
  assert np.abs(np.asarray(run(other, None) - run(tokens, None))).max() > 1e-3


@pytest.mark.parametrize("attention,remat", VARIANTS[::2])
def test_default_positions_and_segments_are_arange_and_one_document(attention, remat):
  cfg = variant(attention, remat)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = packed_inputs()[0]
  arange = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  run = jax.jit(lambda pos, seg: model.apply(cfg, params, tokens, positions=pos,
                                             segment_ids=seg)[0])
  plain = run(None, None)
  np.testing.assert_allclose(run(arange, None), plain, rtol=0, atol=1e-6)
  np.testing.assert_allclose(run(arange, jnp.ones_like(tokens)), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"model.attention": "sparse"},
     r"^model.attention must be one of \('dense', 'blockwise', 'cudnn', 'splash', 'ring'\), "
     r"got 'sparse'$"),
    ({"model.attention": "splash", "model.attention_block": 8},
     r"^model.attention='splash' needs tiles of a multiple of 128 positions \(the kernel's "
     r"lane width\), but model.attention_block=8 with data.seq_len=16 gives 8$"),
    ({"model.attention": "blockwise", "model.attention_block": 6},
     r"^model.attention_block=6 must divide data.seq_len=16 for model.attention='blockwise'$"),
    ({"model.attention_block": 0}, r"^model.attention_block must be an integer >= 1, got 0$"),
    ({"model.attention": "cudnn"},
     r"^model.attention='cudnn' needs model.dtype='bfloat16' \(cuDNN's fused attention takes "
     r"16-bit inputs only\), got 'float32'$"),
])
def test_bad_attention_config_is_one_sentence(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(overrides_lib.apply(small_config(), overrides))
