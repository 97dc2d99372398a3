"""Who reports at each sync (issue 13): dropped outer gradients, outages and rejoins, and
quarantined non-finite workers, against a slow reference written from the rules in faults.py and
algorithm.py; a worker absent for the whole run is the run without it, bit for bit; every worker
non-finite stops the run with a good checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diloco_jax import algorithm, checkpoint, config as config_lib, faults as faults_lib
from diloco_jax import fragments, mesh as mesh_lib, train
from tests import toy
from tests.test_train import small_config

INNER, OUTER = optax.adam(1e-2), optax.sgd(0.4, 0.9, nesterov=True)


def _algo(M, H, *, tau=0, alpha=0.0, layers=1, faults=None, **kw):
  return algorithm.StreamingDiLoCo(
      toy.loss_fn, INNER, OUTER, num_workers=M, inner_steps=H, mesh=mesh_lib.make_mesh(M),
      fragments=lambda p: fragments.by_blocks(p, layers_per_fragment=layers), overlap_steps=tau,
      merge_alpha=alpha, faults=faults, **kw)


def _run(algo, params, batches, poison=None):
  """poison: {t: [workers]}: those workers' parameters become NaN just before inner step t."""
  state = algo.init(params, jax.random.PRNGKey(3))
  metrics = {}
  for t, b in enumerate(batches, start=1):
    for w in (poison or {}).get(t, ()):
      state = state.replace(local_params=jax.tree.map(lambda x: x.at[w].set(jnp.nan),
                                                      state.local_params))
    state, m = algo.step(state, b, t)
    metrics[t] = m
  state, m = algo.final_sync(state, len(batches))
  metrics["final"] = m
  return state, metrics


def reference(params, batches, *, M, schedule, leaf_fragment, tau, alpha, faults, poison=None):
  """Algorithm 2 with participation, in Python loops over workers, fragments and leaves (fp32,
  one τ for every worker). At a sync of fragment p at step t the workers that report
  (faults.mask(t, p)) with a finite Δ are in the mean, Δ̄ = Σ_included Δ_m / k; τ steps later
  (at once for τ = 0) θ_g steps on Δ̄ if k > 0, included workers α-merge, the others take θ_g,
  and the non-finite ones restart wholly from θ_g with fresh Adam moments. A worker back from an
  outage restarts from θ_g before its inner step (fresh moments with faults.reset_inner_opt).
  After step T: the pending receives, then one more sync of every fragment not sent at T."""
  leaves0, treedef = jax.tree.flatten(params)
  P = max(leaf_fragment) + 1
  idx = [[i for i, f in enumerate(leaf_fragment) if f == p] for p in range(P)]
  local = [list(leaves0) for _ in range(M)]
  opt_states = [INNER.init(params) for _ in range(M)]
  g = list(leaves0)
  outer_states = [OUTER.init([g[i] for i in idx[p]]) for p in range(P)]
  pending = {}   # p -> (arrival step, mean, status)

  def restart(m, fresh_moments):
    local[m] = list(g)
    if fresh_moments:
      fresh = INNER.init(jax.tree.unflatten(treedef, g))
      opt_states[m] = jax.tree.map(
          lambda f, o: f if jnp.issubdtype(o.dtype, jnp.floating) else o, fresh, opt_states[m])

  def send(t, p):
    mask = faults.mask(t, p) if faults is not None else np.ones(M)
    deltas = [[g[i] - local[m][i] for i in idx[p]] for m in range(M)]
    finite = [all(bool(jnp.all(jnp.isfinite(x))) for x in deltas[m]) for m in range(M)]
    status = [(1.0 if mask[m] else 0.0) if finite[m] else -1.0 for m in range(M)]
    k = sum(s == 1 for s in status)
    mean = [sum(deltas[m][j] for m in range(M) if status[m] == 1) / max(k, 1)
            for j in range(len(idx[p]))]
    return mean, status

  def receive(p, mean, status):
    if any(s == 1 for s in status):
      upd, outer_states[p] = OUTER.update(mean, outer_states[p], [g[i] for i in idx[p]])
      for i, v in zip(idx[p], optax.apply_updates([g[i] for i in idx[p]], upd)):
        g[i] = v
    for m in range(M):
      for i in idx[p]:
        mix = alpha * local[m][i] + (1 - alpha) * g[i] if alpha else g[i]
        local[m][i] = mix if status[m] == 1 else g[i]
    for m in range(M):
      if status[m] < 0:
        restart(m, True)

  T = len(batches)
  for t, batch in enumerate(batches, start=1):
    for w in (poison or {}).get(t, ()):
      local[w] = [x * jnp.nan for x in local[w]]
    for w in faults.rejoining(t) if faults is not None else ():
      restart(w, faults.reset_inner_opt)
    toy.reference_inner_steps(INNER, treedef, local, opt_states, batch)
    for p in [p for p, (s, _, _) in pending.items() if s == t]:
      receive(p, *pending.pop(p)[1:])
    for p in schedule.sends(t):
      mean, status = send(t, p)
      if tau == 0:
        receive(p, mean, status)
      else:
        pending[p] = (t + tau, mean, status)
  for p, (_, mean, status) in sorted(pending.items(), key=lambda kv: kv[1][0]):
    receive(p, mean, status)
  for p in range(P):
    if schedule.last_send(p, T) != T:
      receive(p, *send(T, p))
  return jax.tree.unflatten(treedef, g), [jax.tree.unflatten(treedef, w) for w in local]


CASES = [  # (M, H, τ, α, blocks, T, drop_prob, outages, reset, poison)
    (3, 4, 1, 0.5, 1, 17, 0.5, (), False, None),              # Streaming, P=2, drops
    (2, 4, 0, 0.0, 1, 14, 0.0, ((1, 3, 6),), True, None),      # DiLoCo-like, an outage, fresh Adam
    (3, 6, 2, 0.5, 2, 20, 0.3, ((0, 5, 4), (2, 9, 9)), False, None),   # drops and outages
    (2, 4, 1, 0.5, 1, 12, 0.0, (), False, {6: [1]}),           # worker 1 goes NaN: quarantined
    (2, 4, 0, 0.0, 1, 12, 0.0, (), False, {5: [0, 1]}),        # both: θ_g keeps its last value
]


@pytest.mark.parametrize("M,H,tau,alpha,blocks,T,drop,outages,reset,poison", CASES)
def test_participation_equals_the_slow_reference(M, H, tau, alpha, blocks, T, drop, outages,
                                                 reset, poison):
  params = toy.init_params(num_blocks=blocks)
  f = faults_lib.FaultSchedule(M, drop, outages, seed=7, reset_inner_opt=reset)
  algo = _algo(M, H, tau=tau, alpha=alpha, faults=f)
  bs = toy.batches(T, M)
  state, metrics = _run(algo, params, bs, poison)
  ref_g, ref_w = reference(params, bs, M=M, schedule=algo.schedule,
                           leaf_fragment=algo.fragments.leaf_fragment, tau=tau, alpha=alpha,
                           faults=f if f.active else None, poison=poison)
  toy.assert_close_to_reference(state.outer_params, state.local_params, ref_g, ref_w, tol=5e-6)
  for x in jax.tree.leaves(state.local_params) + jax.tree.leaves(state.inner_opt_state):
    assert np.all(np.isfinite(np.asarray(x)))   # quarantined workers came back finite
  # The metrics count who was in each sync, and the bits are what the reporting workers sent.
  if not poison:
    for t in range(1, T + 1):
      for p in algo.schedule.sends(t):
        assert float(metrics[t][f"participants/{p}"]) == f.mask(t, p).sum()
        assert float(metrics[t][f"quarantined/{p}"]) == 0.0
  if f.active:
    full = algo.fragment_bits
    want = sum(k * algo.fragment_bits_k[p][k] / M for t in range(1, T + 1)
               for p in algo.schedule.sends(t) for k in [int(f.mask(t, p).sum())])
    assert sum(algo.bits_sent(t) for t in range(1, T + 1)) == pytest.approx(want, rel=1e-12)
    assert want < sum(full[p] for t in range(1, T + 1) for p in algo.schedule.sends(t))


def test_quarantine_counts_the_non_finite_worker_and_the_mean_is_the_others():
  M, H = 2, 4
  params = toy.init_params(num_blocks=1)
  algo = _algo(M, H, tau=0)
  state, metrics = _run(algo, params, toy.batches(8, M), poison={3: [1]})
  p = algo.schedule.sends(4)[0]   # the first sync after worker 1 went NaN
  assert float(metrics[4][f"quarantined/{p}"]) == 1.0
  assert float(metrics[4][f"participants/{p}"]) == 1.0
  assert np.isfinite(float(metrics[4][f"outer_grad_norm/{p}"]))


def test_a_worker_absent_for_the_whole_run_is_the_run_without_it_bit_for_bit():
  """M=3 with worker 2 down from step 1 to the end: the mean is exactly workers 0 and 1's, so
  θ_g is the M=2 run's on the same two workers' batches, bit for bit."""
  H, T = 4, 13
  params = toy.init_params(num_blocks=1)
  b2 = toy.batches(T, 2)
  b3 = [jnp.concatenate([b, b[:1] * 3.0], axis=0) for b in b2]   # worker 2: other data
  for tau, alpha in ((0, 0.0), (1, 0.5)):
    two, _ = _run(_algo(2, H, tau=tau, alpha=alpha), params, b2)
    three, _ = _run(_algo(3, H, tau=tau, alpha=alpha,
                          faults=faults_lib.FaultSchedule(3, outages=((2, 1, T + 5),))),
                    params, b3)
    for x, y in zip(jax.tree.leaves(two.outer_params), jax.tree.leaves(three.outer_params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(two.local_params), jax.tree.leaves(three.local_params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y)[:2])


def test_every_worker_non_finite_stops_the_run_with_a_good_checkpoint(tmp_path, monkeypatch):
  from diloco_jax import build  # noqa: PLC0415
  real = build.make_algorithm

  def poisoned(*args, **kwargs):
    algo = real(*args, **kwargs)
    step = algo.step

    def step_with_nan(state, batch, t):
      if t == 6:   # every worker diverges during round 2 (H=4): the sync at step 8 sees it
        state = state.replace(local_params=jax.tree.map(lambda x: x * jnp.nan,
                                                        state.local_params))
      return step(state, batch, t)
    algo.step = step_with_nan
    return algo

  monkeypatch.setattr(build, "make_algorithm", poisoned)
  with pytest.raises(train.Diverged, match=r"^every worker's outer gradient of fragment 0 was "
                     r"non-finite at step 8, so the run stopped; the checkpoint of step 8 in "):
    train.run(small_config(), str(tmp_path))
  ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"))
  assert ckpt.latest_step() == 8   # saved when the row of step 8 showed it, before anything else
  state, _ = ckpt.restore_saved(8)
  ckpt.close()
  g = [np.asarray(x) for x in jax.tree.leaves(state["outer_params"])]
  for x in g + [np.asarray(x) for x in jax.tree.leaves(state["inner_opt_state"])]:
    assert np.all(np.isfinite(x))
  for x, y in zip(jax.tree.leaves(state["local_params"]), g):   # every worker is θ_g
    np.testing.assert_array_equal(np.asarray(x), np.broadcast_to(y, np.asarray(x).shape))


@pytest.mark.parametrize("overrides,message", [
    ({"diloco.drop_prob": 1.0}, r"diloco.drop_prob must be in \[0, 1\), got 1.0"),
    ({"diloco.outages": ((2, 1, 3),)}, r"diloco.outages entries must be \(worker, step, "
     r"duration\) with 0 <= worker < M=2, step >= 1 and duration >= 1, got \(2, 1, 3\)"),
    ({"diloco.outages": ((0, 1),)}, r"diloco.outages must be a sequence of \(worker, step, "
     r"duration\) triples"),
    ({"diloco.outages": ((0, 50, 3),)}, r"diloco.outages \[\(0, 50, 3\)\] start after the last "
     r"step \(train.num_steps=12\)"),
    ({"algorithm": "dp", "diloco.drop_prob": 0.5}, r"diloco.drop_prob and diloco.outages need "
     r"algorithm='diloco' or 'streaming' without diloco.eager or diloco.delayed"),
    ({"diloco.eager": True, "diloco.drop_prob": 0.5}, r"diloco.drop_prob and diloco.outages"),
])
def test_bad_fault_configs_are_one_sentence(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.from_config_dict(small_config(**overrides))
