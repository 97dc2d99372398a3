"""Blockwise (flash-style) attention against the dense reference: the kernel and the whole
model, forward and gradient, to 1e-5; its config errors are one sentence naming the key."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import config as config_lib, model
from diloco_jax.model.blockwise import blockwise_attention
from tests import overrides as overrides_lib
from tests.test_train import small_config

B, L, H, K = 2, 16, 2, 8


def dense_attention(q, k, v):
  """The slow obvious reference: every score, a causal mask, a softmax."""
  s = jnp.einsum("bqhk,bshk->bhqs", q, k) * K**-0.5
  s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
  return jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("block", [4, 16])   # 4 tiles per row (diagonal skipping) and one tile
def test_blockwise_equals_dense_forward_and_gradient(block):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (3.0 * jax.random.normal(kk, (B, L, H, K)) for kk in keys[:3])   # peaked softmax
  fast = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, block))
  np.testing.assert_allclose(fast(q, k, v), dense_attention(q, k, v), rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(keys[3], (B, L, H, K))
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot),
                                    argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grad(fast), grad(dense_attention), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("overrides,message", [
    ({"model.attention": "ring"},
     r"^model.attention must be one of \('dense', 'blockwise'\), got 'ring'$"),
    ({"model.attention": "blockwise", "model.attention_block": 6},
     r"^model.attention_block=6 must divide data.seq_len=16 for model.attention='blockwise'$"),
    ({"model.attention_block": 0}, r"^model.attention_block must be an integer >= 1, got 0$"),
])
def test_bad_attention_config_is_one_sentence(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(overrides_lib.apply(small_config(), overrides))
