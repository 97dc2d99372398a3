"""The one-round delay (SPEC §5): naive delayed outer gradients and eager updates, against a slow
reference written from the formulas, a hand-derived two-worker example, M=1 reductions, the
final sync and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diloco_jax import algorithm, config as config_lib, fragments, inner, mesh as mesh_lib
from diloco_jax import quantize
from tests import toy
from tests.test_train import small_config


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _algo(M, H, delay, *, layers=1, alpha=0.0, inner_opt=None, outer_opt=None, **kw):
  return algorithm.StreamingDiLoCo(
      toy.loss_fn, inner_opt or optax.adam(1e-2), outer_opt or optax.sgd(0.4, 0.9, nesterov=True),
      num_workers=M, inner_steps=H, mesh=mesh_lib.make_mesh(M),
      fragments=lambda p: fragments.by_blocks(p, layers_per_fragment=layers), merge_alpha=alpha,
      delay=delay, **kw)


def _run(algo, params, batches, final=True):
  state = algo.init(params, jax.random.PRNGKey(3))
  for t, b in enumerate(batches, start=1):
    state, _ = algo.step(state, b, t)
  if final:
    state, _ = algo.final_sync(state, len(batches))
  return state


# ------------------------------------------------------------------ the slow reference (SPEC §5)
def reference_delayed(params, batches, *, M, H, leaf_fragment, alpha, delay, inner_opt,
                      outer_opt, codec=None):
  """Python loops over workers, fragments and leaves. Fragment p (offset p·⌊H/P⌋) syncs at its
  rounds r = 1, 2, …: every worker sends Q(Δ_m(r)), Δ_m = θ_g − θ_m; the mean Δ̄(r) is known
  only at round r+1. naive: θ_g ← OuterOpt(θ_g, Δ̄(r−1)) (nothing at r = 1), shared. eager:
  worker m keeps its own θ_{g,m} and outer state and steps with
  Δ̂_m(r) = Δ_m(r)/M + (1/M)·Σ_{k≠m} Q(Δ_k(r−1)). Then θ_m ← α·θ_m + (1−α)·θ_{g(,m)}.
  After the last step T, the final sync (see StreamingDiLoCo._delayed_final_program)."""
  leaves0, treedef = jax.tree.flatten(params)
  P = max(leaf_fragment) + 1
  idx = [[i for i, f in enumerate(leaf_fragment) if f == p] for p in range(P)]
  eager = delay == "eager"
  local = [list(leaves0) for _ in range(M)]
  opt_states = [inner_opt.init(params) for _ in range(M)]
  copies = M if eager else 1   # outer copies: one per worker (eager) or one shared
  g = [list(leaves0) for _ in range(copies)]
  outer_states = [[outer_opt.init([g[c][i] for i in idx[p]]) for p in range(P)]
                  for c in range(copies)]
  sent = {}   # (p, r) -> per worker, per leaf: Q(Δ_m)
  offset = lambda p: p * (H // P)
  rounds = lambda t, p: (t - offset(p)) // H if t - offset(p) >= H else 0   # rounds done by t
  Q = (lambda x: x) if codec is None else (lambda x: codec.roundtrip(x.ravel()).reshape(x.shape))
  gc = lambda m: 0 if copies == 1 else m    # worker m's outer copy

  def outer_step(c, p, grads):
    upd, outer_states[c][p] = outer_opt.update(grads, outer_states[c][p], [g[c][i] for i in idx[p]])
    for i, v in zip(idx[p], optax.apply_updates([g[c][i] for i in idx[p]], upd)):
      g[c][i] = v

  def merge(p):
    for m in range(M):
      for i in idx[p]:
        local[m][i] = g[gc(m)][i] if alpha == 0 else alpha * local[m][i] + (1 - alpha) * g[gc(m)][i]

  def deltas(p):
    return [[g[gc(m)][i] - local[m][i] for i in idx[p]] for m in range(M)]

  def mean_of(p, r):
    return [sum(sent[p, r][m][j] for m in range(M)) / M for j in range(len(idx[p]))]

  def others(m, p, r):   # (1/M)·Σ_{k≠m} Q(Δ_k(r)); zeros before round 1
    if r == 0:
      return [jnp.zeros_like(leaves0[i]) for i in idx[p]]
    return [sum(sent[p, r][k][j] for k in range(M) if k != m) / M for j in range(len(idx[p]))]

  T = len(batches)
  for t, batch in enumerate(batches, start=1):
    toy.reference_inner_steps(inner_opt, treedef, local, opt_states, batch)
    for p in range(P):
      r = rounds(t, p)
      if r == 0 or rounds(t - 1, p) == r:
        continue
      d = deltas(p)
      sent[p, r] = [[Q(x) for x in d[m]] for m in range(M)]
      if eager:
        for m in range(M):
          outer_step(m, p, [x / M + o for x, o in zip(d[m], others(m, p, r - 1))])
      elif r > 1:
        outer_step(0, p, mean_of(p, r - 1))
      merge(p)
  for p in range(P):   # the final sync
    R = rounds(T, p)
    fresh = not (R > 0 and rounds(T - 1, p) < R)   # not sent at T itself
    if fresh:
      d = deltas(p)
      sent[p, R + 1] = [[Q(x) for x in d[m]] for m in range(M)]
    if eager:
      for m in range(M):
        if fresh:
          outer_step(m, p, [x / M + o for x, o in zip(d[m], others(m, p, R))])
        if M > 1:
          outer_step(m, p, others(m, p, R + 1 if fresh else R))
    else:
      if R > 0:
        outer_step(0, p, mean_of(p, R))
      if fresh:
        outer_step(0, p, mean_of(p, R + 1))
    merge(p)
  outer_mean = [sum(g[c][i] for c in range(copies)) / copies for i in range(len(leaves0))]
  return jax.tree.unflatten(treedef, outer_mean), [jax.tree.unflatten(treedef, w) for w in local]


CASES = [  # (delay, M, H, blocks, layers/fragment, α, T, codec)
    ("naive", 2, 4, 1, 1, 0.0, 12, None),     # DiLoCo-like: P=2, T on fragment 0's round
    ("naive", 3, 6, 2, 1, 0.5, 20, None),     # P=3, T between rounds
    ("eager", 2, 4, 1, 1, 0.0, 12, None),
    ("eager", 3, 6, 2, 1, 0.5, 20, None),
    ("eager", 2, 6, 2, 1, 0.5, 16, "fp4_e3m0"),   # quantized: own term fresh, others' as sent
    ("eager", 2, 6, 2, 1, 0.5, 4, None),      # T before any fragment's first round
]


@pytest.mark.parametrize("delay,M,H,blocks,layers,alpha,T,codec", CASES)
def test_delayed_syncs_and_final_sync_equal_slow_reference(delay, M, H, blocks, layers, alpha, T,
                                                            codec):
  params = toy.init_params(num_blocks=blocks)
  inner_opt, outer_opt = optax.adam(1e-2), optax.sgd(0.4, 0.9, nesterov=True)
  q = None if codec is None else quantize.get_codec(codec, block_size=4)
  bs = toy.batches(T, M)
  algo = _algo(M, H, delay, layers=layers, alpha=alpha, inner_opt=inner_opt, outer_opt=outer_opt,
               codec=q or "fp32")
  state = _run(algo, params, bs)
  g, workers = reference_delayed(params, bs, M=M, H=H, leaf_fragment=algo.fragments.leaf_fragment,
                                 alpha=alpha, delay=delay, inner_opt=inner_opt,
                                 outer_opt=outer_opt, codec=q)
  toy.assert_close_to_reference(algo.eval_params(state), state.local_params, g, workers)
  assert not np.allclose(_leaves(g)[0], _leaves(params)[0])   # the outer copy moved


def _scalar_problem():
  """One scalar θ, loss ½(θ − c)²: an inner SGD step with lr ½ is θ ← (θ + c)/2. Worker 0
  targets c = 4, worker 1 c = 0; both start at 0. DiLoCo (one fragment), H = 1, α = 0, outer
  SGD with lr ½ and no momentum."""
  params = {"w": jnp.zeros((1,))}

  def loss_fn(p, batch_Bx1):
    return 0.5 * jnp.sum((p["w"] - batch_Bx1[0]) ** 2), {}

  def make(delay):
    return algorithm.DiLoCo(loss_fn, optax.sgd(0.5), optax.sgd(0.5), num_workers=2,
                            inner_steps=1, mesh=mesh_lib.make_mesh(2), delay=delay)
  return params, make, [jnp.array([[[4.0]], [[0.0]]])] * 3   # [M, B=1, 1] for t = 1, 2, 3


def test_eager_hand_derived_two_workers():
  """Round 1: θ = (2, 0), Δ = (−2, 0), Δ̄(1) = −1 in flight. Δ̂ = (−2/2 + 0, 0 + 0) = (−1, 0):
  θ_g = (0.5, 0), the workers restart there.
  Round 2: θ = (2.25, 0), Δ = (−1.75, 0), Δ̄(2) = −0.875. Δ̂_0 = −0.875 + (Δ̄(1) − (−2)/2) =
  −0.875, Δ̂_1 = 0 + (−1 − 0) = −1: θ_g = (0.9375, 0.5).
  Round 3: θ = (2.46875, 0.25), Δ = (−1.53125, 0.25), Δ̄(3) = −0.640625. Δ̂_0 = −0.765625 + 0,
  Δ̂_1 = 0.125 − 0.875 = −0.75: θ_g = (1.3203125, 0.875).
  Final sync (sent at T = 3): the others' part of Δ̄(3) lands, 0.125 for worker 0 and −0.765625
  for worker 1: θ_g = (1.2578125, 1.2578125) — without momentum both copies agree."""
  params, make, bs = _scalar_problem()
  algo = make("eager")
  state = _run(algo, params, bs, final=False)
  np.testing.assert_array_equal(state.outer_params["w"][:, 0], [1.3203125, 0.875])
  np.testing.assert_array_equal(state.local_params["w"][:, 0], [1.3203125, 0.875])
  np.testing.assert_array_equal(state.inflight[0][0], [-0.640625])
  np.testing.assert_array_equal(state.sent[0][0][:, 0], [-1.53125, 0.25])
  state, _ = algo.final_sync(state, 3)
  np.testing.assert_array_equal(state.outer_params["w"][:, 0], [1.2578125, 1.2578125])
  np.testing.assert_array_equal(algo.eval_params(state)["w"], [1.2578125])
  assert algo.final_bits(3) == 0   # sent at T: nothing new to send


def test_naive_hand_derived_two_workers():
  """Round 1: θ = (2, 0), Δ̄(1) = −1 in flight, no outer step: the workers restart at 0.
  Round 2: the same again, Δ̄(2) = −1; θ_g ← 0 − 0.5·Δ̄(1) = 0.5.
  Round 3: θ = (2.25, 0.25), Δ = (−1.75, 0.25), Δ̄(3) = −0.75; θ_g ← 0.5 + 0.5 = 1.
  Final sync: Δ̄(3) lands, θ_g = 1.375."""
  params, make, bs = _scalar_problem()
  algo = make("naive")
  state = _run(algo, params, bs, final=False)
  np.testing.assert_array_equal(state.outer_params["w"], [1.0])
  np.testing.assert_array_equal(state.local_params["w"][:, 0], [1.0, 1.0])
  np.testing.assert_array_equal(state.inflight[0][0], [-0.75])
  state, _ = algo.final_sync(state, 3)
  np.testing.assert_array_equal(state.outer_params["w"], [1.375])


@pytest.mark.parametrize("alpha,T", [(0.0, 9), (0.5, 10)])
def test_eager_with_one_worker_is_diloco_without_delay_bit_for_bit(alpha, T):
  """M = 1: the others' part is exactly zero, Δ̂ = Δ, so eager updates are Streaming DiLoCo
  with τ = 0, step by step and through the final sync."""
  params, bs = toy.init_params(), toy.batches(T, 1)
  eager, plain = _algo(1, 3, "eager", alpha=alpha), _algo(1, 3, "none", alpha=alpha)
  a, b = _run(eager, params, bs), _run(plain, params, bs)
  for x, y in zip(_leaves(eager.eval_params(a)), _leaves(plain.eval_params(b)), strict=True):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(_leaves(a.local_params), _leaves(b.local_params), strict=True):
    np.testing.assert_array_equal(x, y)


def test_naive_with_one_worker_applies_each_round_one_round_late():
  """M = 1, DiLoCo, FedAvg outer (SGD lr 1): θ_g after round r is θ_g + Δ(r−1), so the worker
  restarts every round from the point where the round before the last one ended."""
  params, bs = toy.init_params(), toy.batches(6, 1)
  algo = algorithm.DiLoCo(toy.loss_fn, optax.sgd(0.1), optax.sgd(1.0), num_workers=1,
                          inner_steps=2, mesh=mesh_lib.make_mesh(1), delay="naive")
  state = algo.init(params)
  ends = []   # the worker's parameters at the end of each round, before the sync
  for t, b in enumerate(bs, start=1):
    if t % 2 == 0:
      probe = jax.tree.map(lambda x: x[0], state.local_params)
      p_next, _, _, _ = inner.worker_step(toy.loss_fn, optax.sgd(0.1), probe,
                                          jax.tree.map(lambda x: x[0], state.inner_opt_state),
                                          b[0])
      ends.append(p_next)
    state, _ = algo.step(state, b, t)
    if t == 4:   # after round 2: θ_g = θ_0 − Δ(1) = where round 1 ended
      for x, y in zip(_leaves(state.outer_params), _leaves(ends[0])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  assert int(state.step) == 6


BAD = [
    ({"algorithm": "dp", "diloco.eager": True},
     r"diloco.eager=True needs algorithm='diloco' or 'streaming'"),
    ({"diloco.delayed": True, "diloco.offload_outer": True},
     r"diloco.delayed=True overlaps the all-reduce with a whole outer round"),
    ({"diloco.eager": True, "diloco.offload_outer": True},
     r"diloco.eager=True overlaps the all-reduce .* diloco.offload_outer=False"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_delay_configs_are_one_sentence(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(small_config(**overrides))


def test_algorithm_refuses_overlap_with_a_delay():
  with pytest.raises(ValueError, match=r"need diloco.overlap_steps=0"):
    _algo(2, 4, "eager", overlap_steps=1)
  with pytest.raises(ValueError, match=r"the outer delay must be one of"):
    _algo(2, 4, "late")


def test_config_picks_the_delay():
  assert config_lib.from_config_dict(small_config()).diloco.delay == "none"
  assert config_lib.from_config_dict(small_config(**{"diloco.delayed": True})).diloco.delay == "naive"
  assert config_lib.from_config_dict(small_config(**{"diloco.eager": True})).diloco.delay == "eager"
