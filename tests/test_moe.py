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


def one_hot_masks(weights_TxK: jax.Array, experts_TxK: jax.Array, num_experts: int, C: int):
  """Dispatch [T, E, C] (0/1) and combine [T, E, C] (the weights) tensors, and the kept mask
  [T, k]: GShard's one-hot form of `moe.capacity_positions`, the readable reference for the
  layer's scatter/gather."""
  position_TxK, kept_TxK = moe_lib.capacity_positions(experts_TxK, num_experts, C)
  slot_TxKxC = jax.nn.one_hot(jnp.where(kept_TxK, position_TxK, C), C, dtype=jnp.float32)
  dispatch_TxKxExC = (jax.nn.one_hot(experts_TxK, num_experts, dtype=jnp.float32)[..., None]
                      * slot_TxKxC[:, :, None, :])
  combine_TxExC = jnp.einsum("tk,tkec->tec", weights_TxK.astype(jnp.float32), dispatch_TxKxExC)
  return jnp.sum(dispatch_TxKxExC, axis=1), combine_TxExC, kept_TxK


def reference(layer, x_BxLxD):
  """Routing as the layer, then a slow loop over the experts: each expert's MLP on every token,
  kept with its weight where the token chose it (k·E masked sums, nothing gathered)."""
  moe = layer.moe
  x = x_BxLxD.reshape(T, D)
  weights, experts, _ = moe_lib.route(x @ layer.router[...], moe.top_k, moe.combine)
  y = jnp.zeros((T, D), jnp.float32)
  for e in range(moe.num_experts):
    h = x @ layer.experts_up[...][e]
    if moe.mlp == "swiglu":
      h = jax.nn.silu(x @ layer.experts_gate[...][e]) * h
    else:
      h = jax.nn.gelu(h)
    out = h @ layer.experts_down[...][e]
    for j in range(moe.top_k):
      y = y + jnp.where(experts[:, j:j + 1] == e, weights[:, j:j + 1], 0.0) * out
  return y.reshape(B, L, D)


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
  dispatch, combine, kept = one_hot_masks(weights, experts, 2, 2)
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


def test_the_capacity_layer_equals_the_one_hot_dispatch_and_combine_with_drops():
  """The layer scatters/gathers; GShard's one-hot [T, E, C] einsums are the readable form of
  the same routing (at factor 1.0 some assignments are dropped)."""
  layer = _layer(num_experts=4, top_k=2, capacity_factor=1.0, router_init_scale=1.0)
  x = _x()
  state, fn = _pure(layer)
  graphdef, _ = nnx.split(layer)

  def one_hot(state, x_BxLxD):
    m = nnx.merge(graphdef, state)
    x_TxD = x_BxLxD.reshape(T, D)
    w, e, _ = moe_lib.route(x_TxD @ m.router[...], 2)
    dispatch, combine, _ = one_hot_masks(w, e, 4, moe_lib.capacity(T, 4, 2, 1.0))
    h = jnp.einsum("tec,td->ecd", dispatch, x_TxD)
    out = (jax.nn.silu(h @ m.experts_gate[...]) * (h @ m.experts_up[...])) @ m.experts_down[...]
    return jnp.einsum("tec,ecd->td", combine, out).reshape(B, L, D)

  y, aux = jax.jit(fn)(state, x)
  assert 0 < float(aux["dropped_fraction"]) < 1   # the comparison includes drops
  np.testing.assert_allclose(y, jax.jit(one_hot)(state, x), rtol=1e-5, atol=1e-6)
  cot = jax.random.normal(jax.random.key(4), y.shape)
  g = lambda f: jax.jit(jax.grad(lambda s, x: jnp.sum(f(s, x) * cot), argnums=(0, 1)))(state, x)
  for a, b in zip(jax.tree.leaves(g(lambda s, x: fn(s, x)[0])), jax.tree.leaves(g(one_hot)),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_megablox_in_interpret_mode_equals_ragged_dot_forward_and_gradient():
  x = jax.random.normal(jax.random.key(5), (40, 16), jnp.float32)
  w = jax.random.normal(jax.random.key(6), (3, 16, 8), jnp.float32)
  sizes = jnp.array([12, 0, 20], jnp.int32)   # an empty group; rows 32..39 in no group
  f = lambda impl: lambda x, w: moe_lib.grouped_matmul(x, w, sizes, impl)
  ref, got = f("ragged_dot")(x, w), f("megablox_interpret")(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ref[32:], 0.0)
  cot = jax.random.normal(jax.random.key(7), ref.shape)
  grads = lambda impl: jax.grad(lambda x, w: jnp.sum(f(impl)(x, w) * cot), argnums=(0, 1))(x, w)
  for a, b in zip(grads("megablox_interpret"), grads("ragged_dot"), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_expert_that_gets_no_tokens_gets_exactly_zero_gradient_and_no_adam_step():
  """What DiLoCo sees on a worker whose batches never reach expert e: its local update is zero
  (AdamW without weight decay, from a fresh state), so its Δ on that worker is zero and the
  plain mean over workers shrinks that expert's outer gradient by the workers that did route
  to it (docs/design.md, "MoE under DiLoCo")."""
  import optax
  E = 4
  layer = _layer(num_experts=E, top_k=1, capacity_factor=4.0)
  layer.router[...] = jnp.zeros((D, E)).at[:, 0].set(1.0).at[:, 1].set(0.5)
  x = jnp.abs(_x())   # logits Σx > Σx/2 > 0 = 0: every token picks expert 0
  state, fn = _pure(layer)
  grads = jax.grad(lambda s: jnp.sum(fn(s, x)[0] ** 2))(state)
  for name in ("experts_gate", "experts_up", "experts_down"):
    g = np.asarray(grads[name][...])
    assert np.abs(g[0]).max() > 0
    np.testing.assert_array_equal(g[1:], 0.0)
  params = nnx.to_pure_dict(state)
  opt = optax.adamw(1e-2, weight_decay=0.0)
  updates, _ = opt.update(nnx.to_pure_dict(grads), opt.init(params), params)
  np.testing.assert_array_equal(np.asarray(updates["experts_up"])[1:], 0.0)


def test_router_agreement_on_a_hand_made_example():
  # Two workers, one MoE block, three tokens with top-2 sets: {0,1}/{0,1}, {2,3}/{3,2},
  # {0,1}/{2,3}: overlaps 1, 1, 0 -> 2/3.
  a = jnp.array([[[[0, 1], [2, 3], [0, 1]]], [[[0, 1], [3, 2], [2, 3]]]], jnp.int32)
  w = jnp.stack([jnp.ones((1, 2, 2)), jnp.ones((1, 2, 2)) * 3.0])   # norms 2 and 6, diff 4
  out = moe_lib.router_agreement(a, w)
  np.testing.assert_allclose(out["topk_overlap"], [2 / 3], rtol=1e-6)
  np.testing.assert_allclose(out["distance"], [4.0 / 4.0], rtol=1e-6)
  one = moe_lib.router_agreement(a[:1], w[:1])
  assert float(one["topk_overlap"][0]) == 1.0 and float(one["distance"][0]) == 0.0


# --- the MoE inside the transformer ---------------------------------------------------------
def _moe_model(**kw):
  from diloco_jax import model
  moe = moe_lib.MoEConfig(num_experts=4, top_k=2, ffn_dim=16, every=2, capacity_factor=4.0)
  return model.config_from_preset("tiny", num_layers=4, vocab_size=32, d_model=D, num_heads=2,
                                  ffn_dim=F, moe=moe, **kw)


def test_moe_every_second_block_counts_and_flops():
  from diloco_jax import model
  cfg = _moe_model()
  assert cfg.moe_blocks == (1, 3)
  params = model.init_params(cfg, jax.random.key(0))
  assert set(params["blocks"][0]["mlp"]) == {"w_gate", "w_up", "w_down"}
  assert set(params["blocks"][1]["mlp"]) == {"router", "experts_gate", "experts_up",
                                             "experts_down"}
  total, active = model.param_counts(cfg)
  per_expert = 3 * D * 16
  assert total == sum(x.size for x in jax.tree.leaves(params))
  assert total - active == 2 * (4 - 2) * per_expert   # two MoE blocks, E - k idle experts
  # 6 × matmul params (all but the embedding table's lookup and the norm scales; tied: the
  # table is the output projection) + 12 · layers · L · heads · head_dim.
  attn, dense_mlp, router = 4 * D * D, 3 * D * F, D * 4
  matmul = 4 * attn + 2 * dense_mlp + 2 * (router + 2 * per_expert) + 32 * D
  assert model.flops_per_token(cfg, 8) == 6 * matmul + 12 * 4 * 8 * D


def test_moe_loss_adds_the_weighted_aux_losses_and_remat_matches_the_loop():
  import dataclasses
  from diloco_jax import model
  cfg = _moe_model()
  params = model.init_params(cfg, jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (2, 9), 0, 32)
  remat = dataclasses.replace(cfg, remat="block")
  grad = lambda c: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(c, p, batch),
                                              has_aux=True))(params)
  (loss, aux), g0 = grad(cfg)
  want = (aux["ce"] + aux["z_loss"] + 0.01 * (aux["moe/b1/load_balance_loss"]
                                              + aux["moe/b3/load_balance_loss"])
          + 1e-3 * (aux["moe/b1/router_z_loss"] + aux["moe/b3/router_z_loss"]))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert aux["moe/b1/load"].shape == (4,) and float(jnp.sum(aux["moe/b1/load"])) == 1.0
  np.testing.assert_allclose(aux["moe/load_entropy"],
                             (aux["moe/b1/load_entropy"] + aux["moe/b3/load_entropy"]) / 2)
  (l1, a1), g1 = grad(remat)
  np.testing.assert_allclose(l1, loss, rtol=1e-6)
  for k in aux:
    np.testing.assert_allclose(a1[k], aux[k], rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"^model.moe.every=3 must divide model.num_layers=4 "):
    model.config_from_preset("tiny", num_layers=4, remat="block",
                             moe=moe_lib.MoEConfig(every=3))
