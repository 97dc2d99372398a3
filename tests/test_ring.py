"""Ring attention (model/ring.py) against dense causal softmax attention, forward and gradient to
1e-5: over a 4-device context ring in natural order and in the load-balanced layout, with packed
documents, on meshes whose context axis is 1 or shares devices with data / model, and under the
algorithms' vmap over workers (where every collective-permute stays inside one worker's context
ring). The load-balancing permutation: its exact order, its inverse, its error."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import mesh as mesh_lib
from diloco_jax.model import ring

# The shapes, the packed documents (boundaries inside and across the 4-position shards,
# trailing padding) and the slow obvious reference are test_attention's.
from tests.test_attention import B, H, K, L, dense_attention  # noqa: E402
from tests.test_attention import SEGMENTS_BxL as _SEGMENTS  # noqa: E402
from tests.test_attention import qkv_and_cotangent as _inputs  # noqa: E402

SEGMENTS_BxL = np.asarray(_SEGMENTS)


def _value_and_grads(attend, qkv, cotangent):
  """attention output and the gradient of <o, cotangent> w.r.t. q, k, v."""
  f = lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent)
  return attend(*qkv), jax.grad(f, argnums=(0, 1, 2))(*qkv)


def _assert_close(got, want):
  (o, grads), (o0, grads0) = got, want
  np.testing.assert_allclose(o, o0, atol=1e-5, rtol=1e-5, err_msg="forward")
  for name, g, g0 in zip("qkv", grads, grads0):
    np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@functools.cache
def _mesh(workers=1, **inner):
  n = workers * int(np.prod(list(inner.values())))
  return mesh_lib.make_mesh(workers, devices=jax.devices()[:n], **inner)


def _ring_in_layout(mesh, perm, segments):
  """Ring attention of naturally ordered inputs laid out by `perm` (and back)."""
  inv = ring.inverse_permutation(perm)
  index = jnp.broadcast_to(jnp.asarray(perm), (B, L))
  seg = None if segments is None else jnp.asarray(segments)[:, perm]

  def attend(q, k, v):
    o = ring.ring_attention(q[:, perm], k[:, perm], v[:, perm], index, seg, mesh)
    return o[:, inv]
  return attend


# ------------------------------------------------------------------------------ permutation
def test_load_balance_permutation_exact_order_and_inverse():
  np.testing.assert_array_equal(ring.load_balance_permutation(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  # 4 shards, 8 chunks of 2: shard i holds chunks i and 7 - i.
  np.testing.assert_array_equal(
      ring.load_balance_permutation(16, 4),
      [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
  np.testing.assert_array_equal(ring.load_balance_permutation(6, 1), np.arange(6))
  x = np.arange(24) * 10
  perm = ring.load_balance_permutation(24, 3)
  assert sorted(perm) == list(range(24))
  np.testing.assert_array_equal(x[perm][ring.inverse_permutation(perm)], x)
  np.testing.assert_array_equal(x[ring.inverse_permutation(perm)][perm], x)


def test_load_balance_permutation_balances_the_causal_work():
  """Every shard has the same number of visible (query, key) pairs: the docstring's claim."""
  n, length = 4, 32
  perm = ring.load_balance_permutation(length, n).reshape(n, -1)
  work = [int(np.sum(perm[i][:, None] >= perm.reshape(-1)[None, :])) for i in range(n)]
  assert len(set(work)) == 1, work


@pytest.mark.parametrize("length,n", [(12, 4), (10, 2), (7, 1)])
def test_load_balance_permutation_needs_a_multiple_of_2n(length, n):
  with pytest.raises(ValueError, match=f"multiple of {2 * n}, got {length}"):
    ring.load_balance_permutation(length, n)


def test_ring_attention_needs_context_dividing_the_length():
  q = jnp.zeros((B, 6, H, K))
  with pytest.raises(ValueError, match="mesh.context=4"):
    ring.ring_attention(q, q, q, None, None, _mesh(context=4))


# -------------------------------------------------------------------------- against dense
@pytest.mark.parametrize("packed", [False, True], ids=["one_document", "packed"])
@pytest.mark.parametrize("layout", ["natural", "balanced"])
def test_ring_equals_dense_on_a_4_device_ring(layout, packed):
  mesh = _mesh(context=4)
  qkv, cotangent = _inputs((B, L, H, K))
  segments = SEGMENTS_BxL if packed else None
  perm = (ring.load_balance_permutation(L, 4) if layout == "balanced"
          else np.arange(L, dtype=np.int32))
  got = jax.jit(lambda *a: _value_and_grads(_ring_in_layout(mesh, perm, segments), *a))(
      qkv, cotangent)
  ref = None if segments is None else jnp.asarray(segments)
  _assert_close(got, _value_and_grads(lambda q, k, v: dense_attention(q, k, v, ref), qkv,
                                      cotangent))


@pytest.mark.parametrize("inner", [dict(data=2), dict(context=2, model=2)],
                         ids=["context1_data2", "context2_model2"])
def test_ring_equals_dense_on_other_meshes(inner):
  """context = 1 (no hop at all) and heads split over the model axis next to the ring."""
  mesh = _mesh(**inner)
  qkv, cotangent = _inputs((B, L, H, K), seed=1)
  perm = ring.load_balance_permutation(L, mesh_lib.axis_size(mesh, mesh_lib.CONTEXT))
  got = jax.jit(lambda *a: _value_and_grads(_ring_in_layout(mesh, perm, SEGMENTS_BxL), *a))(
      qkv, cotangent)
  _assert_close(got, _value_and_grads(
      lambda q, k, v: dense_attention(q, k, v, jnp.asarray(SEGMENTS_BxL)), qkv, cotangent))


def test_ring_under_the_worker_vmap_stays_inside_each_workers_ring():
  """worker=2 x data=2 x context=2, vmapped over workers as the algorithms do: a different input
  per worker, each equal to dense; every collective-permute pairs devices of one worker that
  differ only in their context coordinate."""
  M = 2
  mesh = _mesh(workers=M, data=2, context=2)
  qkv, cotangent = _inputs((M, B, L, H, K), seed=2)
  perm = ring.load_balance_permutation(L, 2)
  attend = _ring_in_layout(mesh, perm, SEGMENTS_BxL)
  per_worker = jax.jit(jax.vmap(lambda qkv, ct: _value_and_grads(attend, qkv, ct),
                                spmd_axis_name=mesh_lib.WORKER))
  compiled = per_worker.lower(qkv, cotangent).compile()
  got = compiled(qkv, cotangent)
  seg = jnp.asarray(SEGMENTS_BxL)
  want = jax.vmap(lambda qkv, ct: _value_and_grads(
      lambda q, k, v: dense_attention(q, k, v, seg), qkv, ct))(qkv, cotangent)
  _assert_close(got, want)

  # Device id = ((worker·2 + data)·1 + expert)·2 + context: the ring is the lowest bit.
  ids = np.vectorize(lambda d: d.id)(mesh.devices).reshape(M, 2, 2)
  coord = {int(ids[w, d, c]): (w, d, c) for w in range(M) for d in range(2) for c in range(2)}
  pairs = re.findall(r"collective-permute[^\n]*?source_target_pairs=\{([\d,{}]*)\}",
                     compiled.as_text())
  assert pairs, "no collective-permute in the compiled program"
  for a, b in re.findall(r"\{(\d+),(\d+)\}", ",".join(pairs)):
    (wa, da, ca), (wb, db, cb) = coord[int(a)], coord[int(b)]
    assert (wa, da) == (wb, db) and ca != cb, (a, b)


# ------------------------------------------------------------------ wired into the model and run
def _lm_config(attention, **kw):
  from diloco_jax import model as model_lib
  return model_lib.ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, ffn_dim=64,
                               attention=attention, **kw)


def test_the_model_with_ring_attention_over_context_4_equals_dense():
  """Loss and every gradient of the whole model (load-balanced layout, packed documents) on a
  (context=4) mesh equal the dense model's on one device."""
  from diloco_jax import packing, sharding
  from diloco_jax import model as model_lib
  dense, ringed = _lm_config("dense"), _lm_config("ring")
  params = model_lib.init_params(dense, jax.random.key(0))
  rng = np.random.default_rng(0)
  rows = [packing.pack([rng.integers(0, 32, n) for n in (5, 9, 30)], 33) for _ in range(2)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  mesh = mesh_lib.make_mesh(1, devices=jax.devices()[:4], context=4)
  constrain = sharding.activation_constraint(mesh)
  grad = lambda cfg, c: jax.jit(jax.value_and_grad(
      lambda p: model_lib.loss_fn(cfg, p, batch, c)[0]))(params)
  from diloco_jax.model.layers import _no_constraint
  (want, want_g), (got, got_g) = grad(dense, _no_constraint), grad(ringed, constrain)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_bad_context_configs_name_the_key():
  from diloco_jax import config as config_lib
  from tests.overrides import apply
  from tests.test_train import small_config
  for overrides, match in [
      ({"mesh.context": 2}, r"mesh.context=2 splits the sequence, which only "
                            r"model.attention='ring' supports"),
      ({"mesh.context": 3, "model.attention": "ring"},
       r"data.seq_len=16 must be divisible by 2 \* mesh.context = 6"),
  ]:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.from_config_dict(apply(small_config(), overrides))

