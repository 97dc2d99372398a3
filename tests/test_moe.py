"""The sparse mixture-of-experts feed-forward (model/moe.py) against a slow loop-over-experts
reference, the dense MLP, hand-derived losses and capacity arithmetic, and its config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diloco_jax.model import mlp as mlp_lib
from diloco_jax.model import moe as moe_lib
from diloco_jax.model.config import config_from_preset

B, L, D, F = 2, 8, 16, 32
T = B * L


def _layer(**kw):
  return moe_lib.MoE(D, F, moe_lib.MoEConfig(**kw), nnx.Rngs(params=jax.random.key(0)))


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, L, D), jnp.float32)


def _pure(layer, **call):
  """(state, x) -> (y, aux) for jax.grad: the layer split into graph and state."""
  graphdef, state = nnx.split(layer)
  return state, lambda state, x: nnx.merge(graphdef, state)(x, **call)


def reference(layer, x_BxLxD):
  """Routing as the layer, then a loop: for each token, each of its k experts' MLP, weighted."""
  moe = layer.moe
  x = x_BxLxD.reshape(T, D)
  weights, experts, _ = moe_lib.route(x @ layer.router[...], moe.top_k, moe.combine)
  rows = []
  for t in range(T):
    y = jnp.zeros((D,), jnp.float32)
    for j in range(moe.top_k):
      e = experts[t, j]
      h = x[t] @ layer.experts_up[...][e]
      if moe.mlp == "swiglu":
        h = jax.nn.silu(x[t] @ layer.experts_gate[...][e]) * h
      else:
        h = jax.nn.gelu(h)
      y = y + weights[t, j] * (h @ layer.experts_down[...][e])
    rows.append(y)
  return jnp.stack(rows).reshape(B, L, D)


@pytest.mark.parametrize("dispatch,mlp,combine", [
    ("capacity", "swiglu", "topk_softmax"), ("dropless", "gelu", "softmax_topk")])
def test_capacity_and_dropless_equal_the_loop_reference_forward_and_gradient(dispatch, mlp,
                                                                               combine):
  # A capacity factor of E: every expert can take every token, nothing is dropped.
  layer = _layer(num_experts=4, top_k=2, mlp=mlp, combine=combine, dispatch=dispatch,
                 capacity_factor=4.0, router_init_scale=1.0)
  x = _x()
  state, fn = _pure(layer)
  graphdef, _ = nnx.split(layer)
  ref_fn = jax.jit(lambda s, x: reference(nnx.merge(graphdef, s), x))
  y, aux = jax.jit(fn)(state, x)
  np.testing.assert_allclose(y, ref_fn(state, x), rtol=1e-5, atol=1e-5)
  assert float(aux["dropped_fraction"]) == 0.0
  cot = jax.random.normal(jax.random.key(2), y.shape)
  grad = lambda f: jax.jit(jax.grad(lambda s, x: jnp.sum(f(s, x) * cot), argnums=(0, 1)))
  g_fast = grad(lambda s, x: fn(s, x)[0])(state, x)
  g_ref = grad(ref_fn)(state, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_one_expert_top_one_is_the_dense_mlp():
  cfg = config_from_preset("tiny", d_model=D, num_heads=2, ffn_dim=F)
  dense = mlp_lib.Mlp(cfg, nnx.Rngs(params=jax.random.key(3)))
  for dispatch in moe_lib.DISPATCHES:
    layer = _layer(num_experts=1, top_k=1, dispatch=dispatch, capacity_factor=1.0)
    layer.experts_gate[...] = dense.w_gate[...][None]
    layer.experts_up[...] = dense.w_up[...][None]
    layer.experts_down[...] = dense.w_down[...][None]
    y, aux = layer(_x())
    np.testing.assert_allclose(y, dense(_x()), rtol=1e-6, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0 and float(aux["load_balance_loss"]) == 1.0


def test_load_balance_loss_is_one_when_uniform_and_E_when_collapsed():
  E = 4
  uniform = jnp.zeros((T, E))   # every probability 1/E; ties go to the lowest experts
  for k in (1, 2, 3):
    _, experts, probs = moe_lib.route(uniform, k)
    assert float(moe_lib.load_balance_loss(probs, experts)) == 1.0
  balanced = jnp.tile(jnp.eye(E) * 3.0, (T // E, 1))   # each expert first choice of T/E tokens
  _, experts, probs = moe_lib.route(balanced, 1)
  np.testing.assert_array_equal(moe_lib.expert_load(experts, E), np.full(E, 0.25))
  assert float(moe_lib.load_balance_loss(probs, experts)) == pytest.approx(1.0, abs=1e-6)
  collapsed = jnp.zeros((T, E)).at[:, 0].set(100.0)
  _, experts, probs = moe_lib.route(collapsed, 1)
  assert float(moe_lib.load_balance_loss(probs, experts)) == E
  assert float(moe_lib.router_z_loss(collapsed)) == pytest.approx(100.0**2, rel=1e-6)


def test_combine_weights():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  w, e, p = moe_lib.route(logits, 2, "topk_softmax")
  np.testing.assert_array_equal(e, [[0, 1]])
  np.testing.assert_allclose(w, jax.nn.softmax(jnp.array([[2.0, 1.0]])), rtol=1e-6)
  w, _, _ = moe_lib.route(logits, 2, "softmax_topk")
  np.testing.assert_allclose(w, p[:, :2], rtol=1e-6)


def test_a_hot_router_at_factor_one_drops_exactly_the_tokens_over_capacity():
  E = 4
  layer = _layer(num_experts=E, top_k=1, capacity_factor=1.0)
  layer.router[...] = jnp.zeros((D, E)).at[:, 0].set(1.0)
  x = jnp.abs(_x())   # logits: Σx > 0 for expert 0, 0 for the others: all pick expert 0
  y, aux = layer(x)
  C = moe_lib.capacity(T, E, 1, 1.0)
  assert C == 4
  assert float(aux["dropped_fraction"]) == (T - C) / T
  np.testing.assert_array_equal(aux["expert_load"], [1.0, 0.0, 0.0, 0.0])
  flat = y.reshape(T, D)
  assert np.abs(np.asarray(flat[:C])).min() > 0     # the first C tokens (priority order) kept
  np.testing.assert_array_equal(flat[C:], 0.0)       # the rest: only the residual path
  _, eval_aux = layer(x, train=False)                 # eval capacity factor 2.0: C = 8
  assert float(eval_aux["dropped_fraction"]) == (T - 8) / T


def test_first_choices_take_capacity_before_second_choices():
  # Tokens 0, 1 choose (1, 0); tokens 2, 3 choose (0, 1); C = 2 per expert: every first
  # choice fits, every second choice is over capacity.
  experts = jnp.array([[1, 0], [1, 0], [0, 1], [0, 1]], jnp.int32)
  weights = jnp.full((4, 2), 0.5)
  dispatch, combine, kept = moe_lib.capacity_masks(weights, experts, 2, 2)
  np.testing.assert_array_equal(kept, [[True, False]] * 4)
  assert dispatch.shape == (4, 2, 2) and float(dispatch.sum()) == 4.0
  np.testing.assert_array_equal(dispatch[:, 1, :], [[1, 0], [0, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(dispatch[:, 0, :], [[0, 0], [0, 0], [1, 0], [0, 1]])
  np.testing.assert_allclose(combine, 0.5 * dispatch)


def test_shared_expert_adds_a_dense_mlp():
  with_shared = _layer(num_experts=4, top_k=2, shared_expert=True, capacity_factor=4.0)
  x = _x()
  y, _ = with_shared(x)
  h = jax.nn.silu(x @ with_shared.shared_gate[...]) * (x @ with_shared.shared_up[...])
  np.testing.assert_allclose(y - reference(with_shared, x), h @ with_shared.shared_down[...],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,message", [
    (dict(num_experts=2, top_k=3), "model.moe.top_k=3 must be at most model.moe.num_experts=2"),
    (dict(capacity_factor=0.0), "model.moe.capacity_factor must be a number > 0, got 0.0"),
    (dict(eval_capacity_factor=-1), "model.moe.eval_capacity_factor must be a number > 0"),
    (dict(every=0), "model.moe.every must be an integer >= 1, got 0"),
    (dict(dispatch="megablox"), "model.moe.dispatch must be one of ('capacity', 'dropless')"),
    (dict(load_balance_weight=-0.1), "model.moe.load_balance_weight must be a number >= 0"),
])
def test_bad_moe_config_is_one_sentence(kw, message):
  with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
    moe_lib.MoEConfig(**kw)


def test_expert_weights_shard_over_the_expert_axis_by_the_rule_table():
  from diloco_jax import mesh as mesh_lib, sharding
  from diloco_jax.model import logical_axes
  from jax.sharding import PartitionSpec as P
  params = nnx.to_pure_dict(nnx.split(_layer(num_experts=4, shared_expert=True))[1])
  mesh = mesh_lib.abstract_mesh(2, data=2, expert=2)
  specs = sharding.param_specs(mesh, params, logical_axes(params))
  E, Dm = mesh_lib.EXPERT, mesh_lib.DATA
  assert specs["experts_up"] == specs["experts_gate"] == P(E, Dm)
  assert specs["experts_down"] == P(E, None, Dm)
  assert specs["router"] == P(Dm) and specs["shared_down"] == P(None, Dm)
  with pytest.raises(ValueError, match=r"experts=4 \(model.moe.num_experts\), which "
                     r"mesh.expert=3 does not divide"):
    sharding.param_specs(mesh_lib.abstract_mesh(2, expert=3), params, logical_axes(params))
