"""Expert parallelism (model/moe.py): on a (worker=2, data=2, expert=2) mesh, each device routes
its own tokens and holds half the experts, tokens move by all-to-all (capacity) or all-gather
and reduce-scatter (dropless) over the expert axis only; the loss, its auxiliaries and the
gradients equal the unsharded model's, per worker."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diloco_jax import mesh as mesh_lib, model, sharding
from diloco_jax.model import moe as moe_lib

M, B, L = 2, 4, 8


def _cfg(**moe):
  return model.config_from_preset(
      "tiny", num_layers=2, vocab_size=32, d_model=16, num_heads=2, ffn_dim=32,
      moe=moe_lib.MoEConfig(num_experts=4, top_k=2, router_init_scale=1.0, **moe))


@functools.cache
def _mesh():
  return mesh_lib.make_mesh(M, data=2, expert=2)


def _inputs(cfg):
  keys = jax.random.split(jax.random.key(0), M)
  params = jax.vmap(lambda k: model.init_params(cfg, k))(keys)   # a different model per worker
  batch = jax.random.randint(jax.random.key(1), (M, B, L + 1), 0, 32)
  return params, batch


def _value_and_grad(cfg, constrain):
  f = jax.value_and_grad(lambda p, b: model.loss_fn(cfg, p, b, constrain), has_aux=True)
  return jax.jit(jax.vmap(f, spmd_axis_name=mesh_lib.WORKER) if constrain is not None
                 else jax.vmap(lambda p, b: jax.value_and_grad(
                     lambda p: model.loss_fn(cfg, p, b), has_aux=True)(p)))


@pytest.mark.parametrize("moe", [dict(dispatch="capacity", capacity_factor=4.0),
                                 dict(dispatch="dropless")], ids=["capacity", "dropless"])
def test_expert_parallel_equals_unsharded_loss_aux_and_gradient(moe):
  cfg = _cfg(**moe)
  params, batch = _inputs(cfg)
  mesh = _mesh()
  specs = sharding.param_specs(mesh, jax.tree.map(lambda x: x[0], params),
                               model.logical_axes(jax.tree.map(lambda x: x[0], params)))
  sharded = jax.device_put(params, sharding.named(
      mesh, jax.tree.map(sharding.per_worker, specs, is_leaf=sharding.is_spec)))
  assert sharded["blocks"][0]["mlp"]["experts_up"].sharding.spec[:2] == (
      mesh_lib.WORKER, mesh_lib.EXPERT)
  compiled = _value_and_grad(cfg, sharding.activation_constraint(mesh)).lower(
      sharded, batch).compile()
  (loss, aux), grads = compiled(sharded, batch)
  # The exchange is over the expert axis only: every collective of the dispatch stays inside
  # one worker's 4 devices (worker w holds devices 4w .. 4w + 3).
  hlo = compiled.as_text()
  op = "all-to-all" if moe["dispatch"] == "capacity" else "reduce-scatter"
  groups = re.findall(op + r"\(.*?replica_groups=\{(\{[\d,{}]*\})\}", hlo)
  assert groups, f"no {op} in the compiled program"
  for group in re.findall(r"\{([\d,]+)\}", ",".join(groups)):
    assert len({int(d) // 4 for d in group.split(",")}) == 1, group
  (loss0, aux0), grads0 = _value_and_grad(cfg, None)(params, batch)
  np.testing.assert_allclose(loss, loss0, rtol=1e-5)
  assert set(aux) == set(aux0)
  for k in aux0:
    np.testing.assert_allclose(aux[k], aux0[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(grads0), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_expert_parallel_capacity_is_per_device_group_with_drops():
  """At factor 1.0 tokens are dropped; capacity then counts each device's own tokens (GShard's
  groups): the layer equals the unsharded layer applied to each of the 4 groups on its own."""
  moe = moe_lib.MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0, router_init_scale=1.0)
  D, F, E = 16, 32, 4
  keys = jax.random.split(jax.random.key(2), 5)
  x = jax.random.normal(keys[0], (M, B, L, D))
  router = jax.random.normal(keys[1], (M, D, E))
  experts = [jax.random.normal(k, (M, E) + s) * 0.3
             for k, s in zip(keys[2:], [(D, F), (D, F), (F, D)])]
  mesh = _mesh()
  ep = jax.jit(jax.vmap(lambda x, r, *w: moe_lib._expert_parallel(mesh, moe, 1.0, x, r, list(w)),
                        spmd_axis_name=mesh_lib.WORKER))
  y, aux = ep(x, router, *experts)
  assert float(jnp.mean(aux["dropped_fraction"])) > 0

  def grouped(x, r, *w):   # device (data d, expert e) holds batch rows 2d + e
    ys, dropped = [], []
    for g in range(4):
      y_g, a = moe_lib.routed(moe, 1.0, x[g].reshape(L, D), r, list(w))
      ys.append(y_g.reshape(L, D))
      dropped.append(a["dropped_fraction"])
    return jnp.stack(ys), jnp.mean(jnp.stack(dropped))
  y0, dropped0 = jax.vmap(grouped)(x, router, *experts)
  np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["dropped_fraction"], dropped0, rtol=1e-6)
