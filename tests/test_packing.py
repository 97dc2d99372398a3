"""Document packing (packing.py) and the loss on packed batches (model.loss_fn with a dict)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import model as model_lib
from diloco_jax import packing


def test_pack_lays_documents_end_to_end_with_restarting_positions():
  out = packing.pack([np.array([5, 6, 7]), np.array([8, 9]), np.array([1, 2, 3, 4])], 8,
                     weights=[np.array([1, 1, 1.]), np.array([2, 3.]), np.array([4, 4, 4, 4.])])
  np.testing.assert_array_equal(out["tokens"], [5, 6, 7, 8, 9, 1, 2, 3])
  np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(out["positions"], [0, 1, 2, 0, 1, 0, 1, 2])
  # Target t+1: its own weight inside a document, 0 where a new document starts.
  np.testing.assert_array_equal(out["loss_weights"], [1, 1, 0, 3, 0, 4, 4])
  assert out["tokens"].dtype == np.int32 and out["loss_weights"].dtype == np.float32


def test_pack_pads_a_window_the_documents_do_not_fill():
  out = packing.pack([np.array([5, 6, 7])], 5)
  np.testing.assert_array_equal(out["tokens"], [5, 6, 7, 0, 0])
  np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out["loss_weights"], [1, 1, 0, 0])


def test_single_is_one_segment_with_unit_weights():
  out = packing.single(np.arange(6))
  np.testing.assert_array_equal(out["positions"], np.arange(6))
  np.testing.assert_array_equal(out["segment_ids"], np.ones(6))
  np.testing.assert_array_equal(out["loss_weights"], np.ones(5))


@pytest.mark.parametrize("docs,length,weights,match", [
    ([np.array([1])], 1, None, "length must be at least 2"),
    ([np.array([], int)], 4, None, "document 0 must be a non-empty"),
    ([np.array([1, 2])], 4, [np.ones(3)], r"weights\[0\] has shape"),
    ([np.array([1, 2])], 4, [], "one array per document"),
])
def test_pack_rejects_bad_input(docs, length, weights, match):
  with pytest.raises(ValueError, match=match):
    packing.pack(docs, length, weights)


CFG = model_lib.ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=2, ffn_dim=64,
                            z_loss=0.0)


def _token_ce(params, tokens_BxS):
  logits, _ = model_lib.apply(CFG, params, tokens_BxS[:, :-1])
  lp = jax.nn.log_softmax(logits, -1)
  return -jnp.take_along_axis(lp, tokens_BxS[:, 1:, None], -1)[..., 0]


def test_weighted_loss_is_the_weighted_mean_and_ce_the_plain_mean_of_counted_targets():
  params = model_lib.init_params(CFG, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
  w = jnp.array([[0, 1, 2, 3, 0, 1, 1, 5], [1, 1, 1, 1, 1, 1, 1, 1.]])
  loss, aux = model_lib.loss_fn(CFG, params, {"tokens": tokens, "loss_weights": w})
  ce = _token_ce(params, tokens)
  np.testing.assert_allclose(loss, jnp.sum(w * ce) / jnp.sum(w), rtol=1e-6)
  np.testing.assert_allclose(aux["ce"], jnp.sum(ce * (w > 0)) / jnp.sum(w > 0), rtol=1e-6)
  # Unit weights (or no weights) are the plain array batch.
  plain, _ = model_lib.loss_fn(CFG, params, tokens)
  ones, _ = model_lib.loss_fn(CFG, params, {"tokens": tokens, "loss_weights": jnp.ones((2, 8))})
  np.testing.assert_allclose(ones, plain, rtol=1e-6)


def test_packed_loss_equals_each_document_alone():
  """A packed row's per-target losses are those of its documents run one by one (positions
  restart, no attention across the boundary): would fail if a document saw its neighbour."""
  params = model_lib.init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 32, 5), rng.integers(0, 32, 7)
  row = packing.pack([a, b], 12)
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  _, aux = model_lib.loss_fn(CFG, params, batch)
  ce_a = _token_ce(params, jnp.asarray(a)[None])[0]
  ce_b = _token_ce(params, jnp.asarray(b)[None])[0]
  logits, _ = model_lib.apply(CFG, params, batch["tokens"][:, :-1],
                              positions=batch["positions"][:, :-1],
                              segment_ids=batch["segment_ids"][:, :-1])
  lp = jax.nn.log_softmax(logits, -1)
  ce = -jnp.take_along_axis(lp, batch["tokens"][:, 1:, None], -1)[0, :, 0]
  np.testing.assert_allclose(ce[:4], ce_a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ce[5:11], ce_b[:6], rtol=1e-5, atol=1e-6)
  expected = (jnp.sum(ce_a) + jnp.sum(ce_b[:6])) / 10   # 4 + 6 counted targets
  np.testing.assert_allclose(aux["ce"], expected, rtol=1e-5)
