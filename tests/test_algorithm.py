"""DiLoCo and data-parallel: equivalences with known algorithms, vmap vs a Python loop over
workers, state sharding, and no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diloco_jax import algorithm, fragments, inner, mesh as mesh_lib, outer
from tests import toy


def _run(algo, params, batches):
  state = algo.init(params, jax.random.PRNGKey(0))
  for t, b in enumerate(batches, start=1):
    state, _ = algo.step(state, b, t)
  return state


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_m1_h1_fedavg_outer_equals_plain_training():
  """M=1, H=1, outer SGD lr 1 without momentum is plain training with the inner optimizer."""
  params = toy.init_params()
  opt = optax.adamw(1e-2, b2=0.99, weight_decay=0.01)
  bs = toy.batches(6, M=1)
  algo = algorithm.DiLoCo(toy.loss_fn, opt, optax.sgd(1.0), num_workers=1, inner_steps=1,
                          mesh=mesh_lib.make_mesh(1))
  state = _run(algo, params, bs)
  p, s = params, opt.init(params)
  for b in bs:
    p, s, _, _ = inner.worker_step(toy.loss_fn, opt, p, s, b[0])
  # θ_g − 1·(θ_g − θ_1) equals θ_1 up to one rounding of the subtraction.
  for x, y in zip(jax.tree.leaves(state.outer_params), jax.tree.leaves(p)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  for x, y in zip(jax.tree.leaves(state.local_params), jax.tree.leaves(state.outer_params)):
    np.testing.assert_array_equal(x[0], y)   # workers restart from the outer copy exactly


def test_fedavg_outer_copy_is_worker_mean():
  """Outer SGD lr 1, no momentum: after a sync θ_g is the mean of the workers' parameters."""
  params, M, H = toy.init_params(), 4, 3
  opt = optax.adam(1e-2)
  mesh = mesh_lib.make_mesh(M)
  bs = toy.batches(H, M)
  algo = algorithm.DiLoCo(toy.loss_fn, opt, optax.sgd(1.0), num_workers=M, inner_steps=H,
                          mesh=mesh)
  state = _run(algo, params, bs)
  # The same H inner steps without a sync (H larger than the run) show the workers before it.
  no_sync = algorithm.DiLoCo(toy.loss_fn, opt, optax.sgd(1.0), num_workers=M, inner_steps=99,
                             mesh=mesh)
  workers = jax.tree.map(np.asarray, _run(no_sync, params, bs).local_params)
  for g, w in zip(jax.tree.leaves(state.outer_params), jax.tree.leaves(workers)):
    np.testing.assert_allclose(g, w.mean(axis=0), rtol=0, atol=1e-6)
    assert np.abs(w - w.mean(axis=0)).max() > 1e-3   # the workers really diverged


def _reference_diloco(params, batches, M, H, inner_opt, outer_opt):
  """Slow, obvious DiLoCo (SPEC §1): a Python loop over workers, no vmap."""
  locals_ = [params] * M
  states = [inner_opt.init(params)] * M
  g, gs = params, outer_opt.init(params)
  for t, b in enumerate(batches, start=1):
    for m in range(M):
      locals_[m], states[m], _, _ = inner.worker_step(toy.loss_fn, inner_opt, locals_[m],
                                                      states[m], b[m])
    if t % H == 0:
      deltas = [jax.tree.map(lambda a, c: a - c, g, w) for w in locals_]
      delta = jax.tree.map(lambda *d: jnp.mean(jnp.stack(d), axis=0), *deltas)
      upd, gs = outer_opt.update(delta, gs, g)
      g = optax.apply_updates(g, upd)
      locals_ = [g] * M
  return g, locals_


@pytest.mark.parametrize("M,devices", [(4, 4), (4, 2), (3, 1)])
def test_vmapped_workers_equal_python_loop(M, devices):
  """The WORKER-sharded program (`algorithm.over_workers`: one device's workers unbatched, one
  after another when a device holds several) equals a Python loop over workers."""
  params, H = toy.init_params(), 3
  inner_opt = inner.inner_optimizer(1e-2, 9, warmup_steps=2)
  outer_opt = outer.outer_optimizer("nesterov", 0.7, 0.9)
  bs = toy.batches(8, M)
  mesh = mesh_lib.make_mesh(M, devices=jax.devices()[:devices])
  algo = algorithm.DiLoCo(toy.loss_fn, inner_opt, outer_opt, num_workers=M, inner_steps=H,
                          mesh=mesh)
  state = _run(algo, params, bs)
  g, locals_ = _reference_diloco(params, bs, M, H, inner_opt, outer_opt)
  for x, y in zip(jax.tree.leaves(state.outer_params), jax.tree.leaves(g)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  for m in range(M):
    for x, y in zip(jax.tree.leaves(state.local_params), jax.tree.leaves(locals_[m])):
      np.testing.assert_allclose(x[m], y, rtol=1e-6, atol=1e-6)


def test_state_sharding_of_every_field():
  M = 4
  mesh = mesh_lib.make_mesh(M, data=2)
  algo = algorithm.StreamingDiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.7, 0.9),
                                   num_workers=M, inner_steps=4, mesh=mesh, overlap_steps=1,
                                   error_feedback=True, codec="fp4_e3m0")
  state = algo.init(toy.init_params())
  state, _ = algo.step(state, jax.device_put(toy.batches(1, M, B=4)[0],
                                             mesh_lib.batch_sharding(mesh)), 1)
  assert dict(mesh.shape) == {"worker": 4, "data": 2, "expert": 1, "context": 1, "model": 1}
  for name in ("local_params", "inner_opt_state", "residual"):
    leaves = jax.tree.leaves(getattr(state, name))
    assert leaves, name
    for x in leaves:
      assert x.shape[0] == M
      assert x.sharding.spec[0] == mesh_lib.WORKER, (name, x.sharding)
      assert x.addressable_shards[0].data.shape[0] == 1   # one worker per device column
  for name in ("step", "outer_params", "outer_opt_state", "inflight", "rng"):
    leaves = jax.tree.leaves(getattr(state, name))
    assert leaves, name
    for x in leaves:
      assert x.sharding.is_fully_replicated, (name, x.sharding)
  assert len(state.outer_opt_state) == len(state.inflight) == 1


class CompileCounter:
  """Counts XLA backend compilations through jax.monitoring (listeners cannot be removed, so one
  module-level counter serves every test)."""

  def __init__(self):
    self.n = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, name, _duration, **_):
    if name == "/jax/core/compile/backend_compile_duration":
      self.n += 1


COMPILES = CompileCounter()


@pytest.mark.parametrize("tau", [0, 2])
def test_no_recompilation_after_first_outer_round(tau):
  M, H = 2, 3
  frags = lambda p: fragments.by_blocks(p, layers_per_fragment=1)   # P = 3
  algo = algorithm.StreamingDiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.7, 0.9),
                                   num_workers=M, inner_steps=H, mesh=mesh_lib.make_mesh(M),
                                   fragments=frags, overlap_steps=tau)
  state = algo.init(toy.init_params())
  bs = toy.batches(5 * H, M)
  warm = 2 * H + tau   # by then every fragment has sent and merged at least once
  before = COMPILES.n
  for t in range(1, warm + 1):
    state, _ = algo.step(state, bs[t - 1], t)
  assert COMPILES.n > before   # the counter sees compilations
  before = COMPILES.n
  for t in range(warm + 1, 5 * H + 1):
    state, _ = algo.step(state, bs[t - 1], t)
  jax.block_until_ready(state)
  assert COMPILES.n == before


def test_data_parallel_equals_one_model_on_the_concatenated_batch():
  M = 4
  params = toy.init_params()
  opt = optax.adam(1e-2)
  bs = toy.batches(5, M)
  algo = algorithm.DataParallel(toy.loss_fn, opt, num_workers=M, mesh=mesh_lib.make_mesh(M))
  state = _run(algo, params, bs)
  p, s = params, opt.init(params)
  for b in bs:   # equal per-worker batch sizes: the mean of worker means is the global mean
    p, s, _, _ = inner.worker_step(toy.loss_fn, opt, p, s, b.reshape(-1, 4))
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(p)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert algo.bits_sent(1) == 2 * 3 * n * 32 // 4


def test_bits_sent_diloco_every_h_steps():
  M, H = 2, 5
  params = toy.init_params()
  algo = algorithm.DiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.7), num_workers=M,
                          inner_steps=H, mesh=mesh_lib.make_mesh(M))
  algo.init(params)
  n = sum(x.size for x in jax.tree.leaves(params))
  bits = [algo.bits_sent(t) for t in range(1, 11)]
  assert bits == [0, 0, 0, 0, n * 32, 0, 0, 0, 0, n * 32]   # M=2 ring: 2(M−1)/M = 1 payload


def test_eval_params_choices():
  M = 2
  algo = algorithm.DiLoCo(toy.loss_fn, optax.sgd(0.1), optax.sgd(1.0), num_workers=M,
                          inner_steps=10, mesh=mesh_lib.make_mesh(M))
  state = algo.init(toy.init_params())
  state, _ = algo.step(state, toy.batches(1, M)[0], 1)
  w0 = algo.eval_params(state, "worker0")
  mean = algo.eval_params(state, "worker_mean")
  np.testing.assert_array_equal(w0["head"], state.local_params["head"][0])
  np.testing.assert_allclose(mean["head"], state.local_params["head"].mean(0), rtol=1e-6)
  _assert_trees_equal(algo.eval_params(state), toy.init_params())   # no sync yet
  with pytest.raises(ValueError, match="eval.params"):
    algo.eval_params(state, "best")


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match=r"num_workers \(M\) must be an integer >= 1, got 0"):
    algorithm.DiLoCo(toy.loss_fn, optax.sgd(1), optax.sgd(1), num_workers=0, inner_steps=1)
  with pytest.raises(ValueError, match=r"inner_steps \(H\) must be an integer >= 1, got 0"):
    algorithm.DiLoCo(toy.loss_fn, optax.sgd(1), optax.sgd(1), num_workers=1, inner_steps=0)


def test_step_requires_consecutive_t_and_reinit_rebuilds_programs():
  M, H = 2, 3
  algo = algorithm.StreamingDiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.7), num_workers=M,
                                   inner_steps=H, mesh=mesh_lib.make_mesh(M),
                                   fragments=lambda p: fragments.by_blocks(p, layers_per_fragment=1))
  bs = toy.batches(3, M)
  state0 = algo.init(toy.init_params())
  host0 = jax.device_get(state0)   # step donates its input state
  state, _ = algo.step(state0, bs[0], 1)
  state0 = jax.device_put(host0, algo.state_shardings())
  with pytest.raises(ValueError, match="t must increase by 1"):
    algo.step(state, bs[1], 3)
  with pytest.raises(ValueError, match=r"got t=1 after t=1.*start_at\(t\) begins another run"):
    algo.step(state0, bs[0], 1)
  algo.start_at(1)   # another run of the same object from its first state: t starts over
  again, _ = algo.step(state0, bs[0], 1)
  np.testing.assert_array_equal(np.asarray(again.step), 1)
  for bad in (0, True, 1.5):
    with pytest.raises(ValueError, match="start_at: t must be an integer >= 1"):
      algo.start_at(bad)
  assert algo.fragments.num_fragments == 3
  with pytest.raises(ValueError, match="must be at least the number of fragments"):
    algo.init(toy.init_params(num_blocks=4))   # another structure: P = 5 > H = 3
  algo4 = algorithm.StreamingDiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.7), num_workers=M,
                                    inner_steps=6, mesh=mesh_lib.make_mesh(M),
                                    fragments=lambda p: fragments.by_blocks(p, layers_per_fragment=1))
  algo4.init(toy.init_params())
  state = algo4.init(toy.init_params(num_blocks=4))
  for t, b in enumerate(toy.batches(7, M), start=1):
    state, _ = algo4.step(state, b, t)   # fragment 0 syncs at t=6 with the new programs
  w = toy.init_params(num_blocks=4)["blocks"][0]["w"]
  assert not np.array_equal(np.asarray(state.outer_params["blocks"][0]["w"]), w)


def test_cosine_outer_lr_decays_over_the_outer_steps_then_holds():
  # Plain SGD on Δ = 1: each update is −η_k, η_k = η·(0.05 + 0.95·½(1 + cos(πk/4))), k ≤ 4.
  opt = outer.outer_optimizer("sgd", 0.8, 0.0, schedule="cosine", num_outer_steps=4,
                              final_fraction=0.05)
  g = jnp.zeros(())
  state = opt.init(g)
  got = []
  for _ in range(6):
    upd, state = opt.update(jnp.ones(()), state, g)
    got.append(-float(upd))
  c = np.cos(np.pi / 4)
  want = [0.8, 0.8 * (0.05 + 0.475 * (1 + c)), 0.8 * 0.525, 0.8 * (0.05 + 0.475 * (1 - c)),
          0.8 * 0.05, 0.8 * 0.05]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  const = outer.outer_optimizer("sgd", 0.8, 0.0)   # the default: the papers' constant η
  upd, _ = const.update(jnp.ones(()), const.init(g), g)
  assert float(upd) == pytest.approx(-0.8)
  with pytest.raises(ValueError, match=r"diloco.outer_lr_schedule must be one of"):
    outer.outer_optimizer("sgd", 0.8, 0.0, schedule="linear")

