"""Streaming DiLoCo (Algorithm 2): equivalences, a slow reference, a hand-derived example, the
quantized all-reduce's numerics and HLO, and a host loop that never blocks."""

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src import array as array_impl

from diloco_jax import algorithm, collectives, fragments, inner, mesh as mesh_lib, outer, quantize
from tests import toy


def _run(algo, params, batches, rng=None):
  state = algo.init(params, jax.random.PRNGKey(7) if rng is None else rng)
  for t, b in enumerate(batches, start=1):
    state, _ = algo.step(state, b, t)
  return state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_equal(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------ the slow reference (SPEC §2)
def reference_streaming(params, batches, *, M, H, leaf_fragment, taus, alpha, inner_opt,
                        outer_opt, codec=None, final_sync=False):
  """Algorithm 2 transcribed literally: Python loops over workers and fragments, no vmap.

  Fragment p has offset t_p = p·⌊H/P⌋ and sends at t when (t − t_p) mod H == 0 and t − t_p ≥ H;
  worker m merges it at t_send + τ_m; the outer step happens at the first merge (t_send + min τ).
  `final_sync` (after the last step T): the merges still pending land as they would have in
  the steps after T, then every fragment not sent at T sends, steps and merges once more.
  """
  leaves0, treedef = jax.tree.flatten(params)
  P = max(leaf_fragment) + 1
  idx = [[i for i, f in enumerate(leaf_fragment) if f == p] for p in range(P)]
  local = [list(leaves0) for _ in range(M)]
  opt_states = [inner_opt.init(params) for _ in range(M)]
  g = list(leaves0)
  outer_states = [outer_opt.init([g[i] for i in idx[p]]) for p in range(P)]
  sent_mean = {}
  offset = lambda p: p * (H // P)
  sends_at = lambda t, p: t >= 1 and t - offset(p) >= H and (t - offset(p)) % H == 0

  def outer_step(p):
    upd, outer_states[p] = outer_opt.update(sent_mean[p], outer_states[p], [g[i] for i in idx[p]])
    new = optax.apply_updates([g[i] for i in idx[p]], upd)
    for i, v in zip(idx[p], new):
      g[i] = v

  def merge(p, m):
    for i in idx[p]:
      local[m][i] = g[i] if alpha == 0 else alpha * local[m][i] + (1 - alpha) * g[i]

  def send(p):
    parts = []
    for i in idx[p]:   # each leaf is quantized on its own (blocks never cross leaves)
      deltas = []
      for m in range(M):
        d = (g[i] - local[m][i]).ravel()
        deltas.append(d if codec is None else codec.roundtrip(d))
      parts.append((sum(deltas[1:], deltas[0]) / M).reshape(g[i].shape))
    sent_mean[p] = parts

  def receives(t, T):
    for p in range(P):
      for m in range(M):
        if t - taus[m] <= T and sends_at(t - taus[m], p):
          if m == min(range(M), key=lambda k: taus[k]):   # the first merge of this send
            outer_step(p)
          merge(p, m)

  T = len(batches)
  for t, batch in enumerate(batches, start=1):
    toy.reference_inner_steps(inner_opt, treedef, local, opt_states, batch)
    for p in range(P):
      if sends_at(t, p):
        send(p)
    receives(t, T)
  if final_sync:
    for t in range(T + 1, T + max(taus) + 1):
      receives(t, T)
    for p in range(P):
      if not sends_at(T, p):
        send(p)
        outer_step(p)
        for m in range(M):
          merge(p, m)
  return jax.tree.unflatten(treedef, g), [jax.tree.unflatten(treedef, w) for w in local]


def _streaming(M, H, *, layers=1, tau=0, alpha=0.0, codec="fp32", inner_opt=None,
               outer_opt=None, **kw):
  return algorithm.StreamingDiLoCo(
      toy.loss_fn, inner_opt or optax.adam(1e-2), outer_opt or optax.sgd(0.4, 0.9, nesterov=True),
      num_workers=M, inner_steps=H, mesh=mesh_lib.make_mesh(M),
      fragments=lambda p: fragments.by_blocks(p, layers_per_fragment=layers),
      overlap_steps=tau, merge_alpha=alpha, codec=codec, **kw)


CASES = [  # (M, H, blocks, layers/fragment, τ, α); P = blocks/layers + 1 (the non-block fragment)
    (2, 6, 2, 1, 0, 0.0),     # P=3, no overlap
    (2, 6, 2, 1, 1, 0.5),     # the paper's τ=1
    (3, 6, 4, 2, 3, 0.5),     # P=3, τ = ⌊H/P⌋ + 1 > ⌊H/P⌋: two fragments in flight
    (2, 4, 2, 1, 3, 0.25),    # P=3, τ=3 ≥ ⌊H/P⌋=1: all three in flight
    (2, 6, 2, 2, 2, 1.0),     # α=1
]


@pytest.mark.parametrize("M,H,blocks,layers,tau,alpha", CASES)
def test_vmapped_equals_slow_reference(M, H, blocks, layers, tau, alpha):
  params = toy.init_params(num_blocks=blocks)
  inner_opt, outer_opt = optax.adam(1e-2), optax.sgd(0.4, 0.9, nesterov=True)
  bs = toy.batches(3 * H + 2, M)
  algo = _streaming(M, H, layers=layers, tau=tau, alpha=alpha, inner_opt=inner_opt,
                    outer_opt=outer_opt)
  state = _run(algo, params, bs)
  f = algo.fragments
  g, workers = reference_streaming(params, bs, M=M, H=H, leaf_fragment=f.leaf_fragment,
                                   taus=(tau,) * M, alpha=alpha, inner_opt=inner_opt,
                                   outer_opt=outer_opt)
  toy.assert_close_to_reference(state.outer_params, state.local_params, g, workers)
  assert not np.allclose(_leaves(g)[0], _leaves(params)[0])   # the outer copy moved


def test_heterogeneous_tau_equals_slow_reference():
  M, H, taus = 3, 6, (1, 4, 0)
  params = toy.init_params()
  inner_opt, outer_opt = optax.adam(1e-2), optax.sgd(0.4, 0.9, nesterov=True)
  bs = toy.batches(3 * H + 1, M)
  algo = _streaming(M, H, tau=taus, alpha=0.5, inner_opt=inner_opt, outer_opt=outer_opt)
  state = _run(algo, params, bs)
  g, workers = reference_streaming(params, bs, M=M, H=H, leaf_fragment=algo.fragments.leaf_fragment,
                                   taus=taus, alpha=0.5, inner_opt=inner_opt, outer_opt=outer_opt)
  toy.assert_close_to_reference(state.outer_params, state.local_params, g, workers)


FINAL_CASES = [  # (M, H, blocks, layers/fragment, τ per worker, α, T)
    (2, 6, 2, 1, (0, 0), 0.0, 20),     # P=3, no overlap; fragment 1 (offset 2) just sent at 20
    (2, 6, 2, 1, (1, 1), 0.5, 18),     # τ=1: fragment 0 sent at 18 still on the wire
    (2, 4, 2, 1, (3, 3), 0.25, 13),    # τ=3: all three fragments in flight at T
    (3, 6, 2, 1, (1, 4, 0), 0.5, 19),  # heterogeneous τ: one worker's merge still pending
    (2, 5, 1, 1, (0, 0), 0.0, 11),     # P=2, T one step past fragment 0's sync
]


@pytest.mark.parametrize("M,H,blocks,layers,taus,alpha,T", FINAL_CASES)
def test_final_sync_equals_slow_reference(M, H, blocks, layers, taus, alpha, T):
  params = toy.init_params(num_blocks=blocks)
  inner_opt, outer_opt = optax.adam(1e-2), optax.sgd(0.4, 0.9, nesterov=True)
  bs = toy.batches(T, M)
  algo = _streaming(M, H, layers=layers, tau=taus if len(set(taus)) > 1 else taus[0],
                    alpha=alpha, inner_opt=inner_opt, outer_opt=outer_opt)
  state = _run(algo, params, bs)
  unflushed = algo.eval_params(state)
  state, metrics = algo.final_sync(state, T)
  g, workers = reference_streaming(params, bs, M=M, H=H, leaf_fragment=algo.fragments.leaf_fragment,
                                   taus=taus, alpha=alpha, inner_opt=inner_opt,
                                   outer_opt=outer_opt, final_sync=True)
  toy.assert_close_to_reference(state.outer_params, state.local_params, g, workers)
  flushed = [p for p in range(algo.fragments.num_fragments)
             if algo.schedule.last_send(p, T) != T]
  assert sorted(k for k in metrics if k.startswith("outer_grad_norm/")) == sorted(
      f"outer_grad_norm/{p}" for p in flushed)
  assert algo.final_bits(T) == sum(algo.fragment_bits[p] for p in flushed) > 0
  assert not all(np.array_equal(x, y) for x, y in zip(_leaves(unflushed), _leaves(g)))


def test_final_sync_after_a_diloco_round_is_a_no_op():
  """DiLoCo (one fragment, τ=0) ending on a sync step: θ_g already holds every inner step, so
  the final sync sends nothing and changes nothing (an outer step on Δ = 0 would still move
  θ_g by its momentum)."""
  M, H = 2, 4
  algo = algorithm.DiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.7, 0.9, nesterov=True),
                          num_workers=M, inner_steps=H, mesh=mesh_lib.make_mesh(M))
  state = _run(algo, toy.init_params(), toy.batches(2 * H, M))
  before = jax.device_get(state)
  after, metrics = algo.final_sync(state, 2 * H)
  _assert_equal(after, before)
  assert metrics == {} and algo.final_bits(2 * H) == 0
  assert algo.final_bits(2 * H + 1) == algo.fragment_bits[0]


def test_quantized_equals_slow_reference():
  M, H = 2, 4
  params = toy.init_params()
  codec = quantize.get_codec("fp4_e3m0", block_size=4)
  inner_opt, outer_opt = optax.adam(1e-2), optax.sgd(0.4, 0.9, nesterov=True)
  bs = toy.batches(2 * H + 3, M)
  algo = _streaming(M, H, tau=1, inner_opt=inner_opt, outer_opt=outer_opt, codec=codec)
  state = _run(algo, params, bs)
  g, _ = reference_streaming(params, bs, M=M, H=H, leaf_fragment=algo.fragments.leaf_fragment,
                             taus=(1, 1), alpha=0.0, inner_opt=inner_opt, outer_opt=outer_opt,
                             codec=codec)
  for x, y in zip(_leaves(state.outer_params), _leaves(g)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- bit-exact equivalences
def _plain_diloco(params, batches, M, H, inner_opt, outer_opt, mesh):
  """DiLoCo without fragments, codecs or schedule objects: one jitted inner step for all
  workers and one jitted sync of the whole tree, on the same mesh."""
  wsh = lambda x: jax.lax.with_sharding_constraint(x, mesh_lib.worker_sharding(mesh, x.ndim - 1))

  @jax.jit
  def inner_all(local, opt_state, batch):
    # The algorithm's own lift over the workers (against a loop: test_algorithm.py):
    # one device per worker runs each worker's gradient unbatched, which vmap's batched dots
    # do not reproduce bit for bit.
    local, opt_state = algorithm.worker_steps(toy.loss_fn, inner_opt, mesh, M)(
        local, opt_state, batch)[:2]
    return jax.tree.map(wsh, local), jax.tree.map(wsh, opt_state)

  fp32 = quantize.get_codec("fp32")

  @jax.jit
  def sync(g, outer_state, local):
    # The fp32 all-reduce is collectives.worker_mean (tested bit-exact against jnp.mean above).
    g_leaves, treedef = jax.tree.flatten(g)
    deltas = [a[None] - w for a, w in zip(g_leaves, jax.tree.leaves(local))]
    delta = jax.tree.unflatten(treedef, collectives.worker_mean(deltas, fp32, mesh)[0])
    upd, outer_state = outer_opt.update(delta, outer_state, g)
    g = optax.apply_updates(g, upd)
    return g, outer_state, jax.tree.map(lambda x, w: wsh(jnp.broadcast_to(x[None], w.shape)), g, local)

  local = jax.tree.map(lambda x: wsh(jnp.broadcast_to(x[None], (M,) + x.shape)), params)
  opt_state = jax.vmap(inner_opt.init)(local)
  g, outer_state = params, outer_opt.init(params)
  for t, b in enumerate(batches, start=1):
    local, opt_state = inner_all(local, opt_state, b)
    if t % H == 0:
      g, outer_state, local = sync(g, outer_state, local)
  return g, local


def test_one_fragment_no_overlap_is_diloco_bit_for_bit():
  M, H = 2, 3
  params = toy.init_params()
  inner_opt, outer_opt = optax.adam(1e-2), optax.sgd(0.7, 0.9, nesterov=True)
  mesh = mesh_lib.make_mesh(M)
  bs = toy.batches(3 * H, M)
  algo = algorithm.StreamingDiLoCo(toy.loss_fn, inner_opt, outer_opt, num_workers=M,
                                   inner_steps=H, mesh=mesh, fragments=fragments.single,
                                   overlap_steps=0, merge_alpha=0.0, codec="fp32")
  state = _run(algo, params, bs)
  g, local = _plain_diloco(params, bs, M, H, inner_opt, outer_opt, mesh)
  _assert_equal(state.outer_params, g)
  _assert_equal(state.local_params, local)


def test_alpha_one_leaves_local_parameters_untouched():
  M, H = 2, 4
  params = toy.init_params()
  bs = toy.batches(3 * H, M)
  synced = _run(_streaming(M, H, tau=1, alpha=1.0), params, bs)
  never = _run(_streaming(M, 1000, tau=1, alpha=1.0), params, bs)   # H > T: no sync at all
  _assert_equal(synced.local_params, never.local_params)
  assert not np.array_equal(_leaves(synced.outer_params)[0], _leaves(params)[0])


@pytest.mark.parametrize("wire", ["reference", "packed"])
def test_fp32_codec_equals_unquantized_mean_bit_for_bit(wire):
  M = 2
  mesh = mesh_lib.make_mesh(M)
  rng = np.random.default_rng(0)
  deltas = [jax.device_put(jnp.asarray(rng.normal(size=(M,) + s), jnp.float32),
                           mesh_lib.worker_sharding(mesh, len(s))) for s in [(3, 5), (7,)]]
  fn = jax.jit(lambda d: collectives.worker_mean(d, quantize.get_codec("fp32"), mesh, wire=wire))
  mean, sent, _ = fn(deltas)
  for m, d in zip(mean, deltas):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(jnp.mean(d, axis=0)))
  for s, d in zip(sent, deltas):
    np.testing.assert_array_equal(np.asarray(s), np.asarray(d))


@pytest.mark.parametrize("codec", ["bf16", "fp8_e4m3", "fp4_e2m1", "fp4_e3m0"])
def test_packed_wire_equals_reference_numerics(codec):
  M = 2
  mesh = mesh_lib.make_mesh(M)
  c = quantize.get_codec(codec, block_size=8)
  rng = np.random.default_rng(1)
  deltas = [jax.device_put(jnp.asarray(rng.normal(size=(M, 40)), jnp.float32),
                           mesh_lib.worker_sharding(mesh, 1))]
  ref = jax.jit(lambda d: collectives.worker_mean(d, c, mesh, wire="reference"))(deltas)
  packed = jax.jit(lambda d: collectives.worker_mean(d, c, mesh, wire="packed"))(deltas)
  _assert_equal(ref[1], packed[1])   # what each worker sent: the same codes and scales
  if codec in ("bf16", "fp4_e3m0"):   # exact decodes: a + b is the same sum in either order
    _assert_equal(ref[0], packed[0])
  else:   # an inexact code × scale may be FMA-fused into the sum in one program only: the
    # means then differ by at most one rounding of a summand (half an ulp each, /M).
    sent = np.asarray(ref[1][0])
    bound = np.spacing(np.abs(sent).max(axis=0))
    diff = np.abs(np.asarray(ref[0][0]) - np.asarray(packed[0][0]))
    assert (diff <= bound).all()
  np.testing.assert_allclose(np.asarray(ref[2]), np.asarray(packed[2]), rtol=1e-6)
  expected = np.mean([np.asarray(c.roundtrip(deltas[0][m])) for m in range(M)], axis=0)
  np.testing.assert_allclose(np.asarray(ref[0][0]), expected, rtol=0,
                             atol=float(np.spacing(np.abs(expected).max())))


# --------------------------------------------------------------------------- hand-derived
def test_hand_derived_two_workers_two_fragments():
  """M=2, P=2 (w in block 0, b outside), H=2, τ=1, α=0.5, inner SGD lr 0.5, outer SGD lr 0.5.

  Per-parameter loss ½(θ − c)², so an inner step is θ ← (θ + c)/2. Worker 0 targets (w, b) =
  (4, 8), worker 1 targets (0, 0); all start at 0. Offsets t_0 = 0, t_1 = 1: w sends at 2, 4 and
  merges at 3, 5; b sends at 3, 5 and merges at 4, 6.
    t=1: w=(2, 0), b=(4, 0).   t=2: w=(3, 0), b=(6, 0); send w: Δ=(0−3, 0−0), mean −1.5.
    t=3: w=(3.5, 0), b=(7, 0); merge w: g_w = 0 − 0.5·(−1.5) = 0.75,
         w = (½·3.5 + ½·0.75, ½·0 + ½·0.75) = (2.125, 0.375); send b: mean (−7 + 0)/2 = −3.5.
    t=4: w=(3.0625, 0.1875), b=(7.5, 0); merge b: g_b = 1.75, b = (4.625, 0.875);
         send w: Δ=(0.75−3.0625, 0.75−0.1875) = (−2.3125, 0.5625), mean −0.875.
    t=5: w=(3.53125, 0.09375), b=(6.3125, 0.4375); merge w: g_w = 0.75 + 0.4375 = 1.1875,
         w = (2.359375, 0.640625); send b: Δ=(1.75−6.3125, 1.75−0.4375), mean −1.625 (in flight).
  Every number is dyadic, so fp32 holds them exactly.
  """
  params = {"blocks": {0: {"w": jnp.zeros((1,))}}, "b": jnp.zeros((1,))}

  def loss_fn(p, batch_Bx2):
    c = batch_Bx2[0]
    return 0.5 * jnp.sum((p["blocks"][0]["w"] - c[0]) ** 2) + 0.5 * jnp.sum((p["b"] - c[1]) ** 2), {}

  M = 2
  algo = algorithm.StreamingDiLoCo(
      loss_fn, optax.sgd(0.5), optax.sgd(0.5), num_workers=M, inner_steps=2,
      mesh=mesh_lib.make_mesh(M), fragments=lambda p: fragments.by_blocks(p, layers_per_fragment=1),
      overlap_steps=1, merge_alpha=0.5)
  batch = jnp.array([[[4.0, 8.0]], [[0.0, 0.0]]])   # [M, B=1, 2]
  state = _run(algo, params, [batch] * 5)
  assert algo.fragments.leaf_fragment == (1, 0)   # leaves in order: b, blocks/0/w
  np.testing.assert_array_equal(state.local_params["blocks"][0]["w"][:, 0], [2.359375, 0.640625])
  np.testing.assert_array_equal(state.local_params["b"][:, 0], [6.3125, 0.4375])
  np.testing.assert_array_equal(state.outer_params["blocks"][0]["w"], [1.1875])
  np.testing.assert_array_equal(state.outer_params["b"], [1.75])
  np.testing.assert_array_equal(state.inflight[1][0], [-1.625])
  assert int(state.step) == 5


# ---------------------------------------------------------------- the wire in compiled HLO
def test_packed_wire_hlo_moves_low_bit_payload_and_bits_match_metrics():
  M, H = 4, 4
  codec = quantize.get_codec("fp4_e3m0", block_size=8)
  algo = _streaming(M, H, tau=1, codec=codec, wire="packed")
  state = algo.init(toy.init_params())
  f = algo.fragments
  for p in range(f.num_fragments):
    args = (f.select(state.outer_params, p), f.select(state.local_params, p), [], state.rng,
            algo._everyone)
    hlo = algo._send[p].lower(*args).compile().as_text()
    gathers = re.findall(r"= (\w+)\[([\d,]*)\]\{[\d,]*\} all-gather\(", hlo)
    assert {g[0] for g in gathers} == {"u8", "f32"}, gathers   # packed codes, block scales
    moved_bits = 0
    for dtype, shape in gathers:
      per_worker = int(np.prod([int(d) for d in shape.split(",")])) // M
      moved_bits += (M - 1) * per_worker * {"u8": 8, "f32": 32}[dtype]   # ring: M−1 shards
    # Apart from the gathers, only scalar diagnostics (the quantizer's error) cross workers.
    for reduce_line in re.findall(r"all-reduce\([^\n]*", hlo):
      assert not re.search(r"\w+\[\d", reduce_line.split("all-reduce(")[0]), reduce_line
    for shapes in re.findall(r"= \(?([^=]*?)\)? all-reduce\(", hlo):
      assert re.fullmatch(r"(f32\[\](, )?(/\*index=\d+\*/)?)+", shapes), shapes
    shapes = [x.shape for x in f.select(toy.init_params(), p)]
    assert moved_bits == collectives.bits_per_worker(shapes, codec, M, "packed")
    assert algo.bits_sent(H + algo.schedule.offset(p)) == moved_bits
    assert moved_bits == (M - 1) * sum(codec.payload_bits(int(np.prod(s))) for s in shapes)


# ---------------------------------------------------------------------- the host never waits
@contextlib.contextmanager
def no_host_reads(waited: list):
  """Fails any read of a device value on the host (float(), np.asarray, .item(), printing...),
  all of which go through ArrayImpl._value, and records every block_until_ready. (On CPU the
  device-to-host transfer guard does not fire: device memory is host memory.)"""
  def refuse(*_, **__):
    raise AssertionError("the host loop read a device value")
  original = array_impl.ArrayImpl.block_until_ready

  def record(self):
    waited.append(self)
    return original(self)
  with mock.patch.object(array_impl.ArrayImpl, "_value", property(refuse)), \
       mock.patch.object(array_impl.ArrayImpl, "block_until_ready", record):
    yield


def test_host_loop_never_reads_device_values_and_runs_two_steps_ahead():
  """The steady-state loop (inner steps, sends in flight, merges, quantization, error feedback)
  only dispatches: it reads no device value, and the only wait is the dispatch bound's, on the
  inner step two steps back (never the step just dispatched)."""
  M, H = 2, 4
  algo = _streaming(M, H, tau=2, alpha=0.5, codec="fp4_e3m0", error_feedback=True)
  bs = [jax.device_put(b, mesh_lib.batch_sharding(algo.mesh)) for b in toy.batches(4 * H, M)]
  state = algo.init(toy.init_params())
  for t in range(1, 2 * H + 1):   # compile everything first
    state, _ = algo.step(state, bs[t - 1], t)
  waited, losses = [], {}
  with no_host_reads(waited):
    for t in range(2 * H + 1, 4 * H + 1):
      state, metrics = algo.step(state, bs[t - 1], t)
      losses[t] = metrics["loss"]
    with pytest.raises(AssertionError, match="read a device value"):
      float(metrics["loss"][0])   # the guard does catch a read
  # Waits at t = 2H+1, 2H+2 are on steps 2H−1, 2H (before the guard); then on t − 2.
  assert [id(w) for w in waited[2:]] == [id(losses[t - 2]) for t in range(2 * H + 3, 4 * H + 1)]
  assert np.isfinite(np.asarray(metrics["loss"])).all()


def test_error_feedback_residual_is_what_quantization_dropped():
  M, H = 2, 2
  codec = quantize.get_codec("fp4_e3m0", block_size=4)
  algo = _streaming(M, H, layers=2, codec=codec, error_feedback=True)   # P=2, τ=0
  params = toy.init_params()
  bs = toy.batches(H, M)
  state = algo.init(params)
  state, _ = algo.step(state, bs[0], 1)
  state, _ = algo.step(state, bs[1], 2)   # fragment 0 (the blocks) sends at t=H=2
  f = algo.fragments
  # Recompute: Δ_m = θ_g − θ_m after step 2 for fragment 0, quantized per worker.
  no_sync = _streaming(M, 100, layers=2)
  workers = _run(no_sync, params, bs).local_params
  idx = f.leaf_indices(0)
  delta = [np.asarray(f.select(params, 0)[k])[None] - np.asarray(f.select(workers, 0)[k])
           for k in range(len(idx))]
  for d, i in zip(delta, idx):   # quantized leaf by leaf
    flat = d.reshape(M, -1)
    sent = np.stack([np.asarray(codec.roundtrip(jnp.asarray(flat[m]))) for m in range(M)])
    np.testing.assert_allclose(np.asarray(state.residual[i]).reshape(M, -1), flat - sent,
                               rtol=0, atol=1e-6)
  assert max(np.abs(np.asarray(state.residual[i])).max() for i in idx) > 0
  for i in f.leaf_indices(1):   # fragment 1 has not sent: its residual is still zero
    assert not np.asarray(state.residual[i]).any()


def test_stochastic_rounding_uses_fresh_randomness_per_send():
  M, H = 2, 2
  algo = _streaming(M, H, layers=2, codec=quantize.get_codec("fp4_e3m0", 4, stochastic=True))
  state = algo.init(toy.init_params(), jax.random.PRNGKey(3))
  keys = [np.asarray(state.rng)]
  for t, b in enumerate(toy.batches(2 * H, M), start=1):
    state, _ = algo.step(state, b, t)
    keys.append(np.asarray(state.rng))
  changed = [not np.array_equal(a, b) for a, b in zip(keys, keys[1:])]
  assert changed == [algo.schedule.sends(t) != () for t in range(1, 2 * H + 1)]


def test_error_feedback_adds_the_residual_to_the_next_send():
  """Two sends of the same fragment: the second quantizes Δ₂ + r₁, and r₂ = Δ₂ + r₁ − Q(Δ₂ + r₁).
  Checked against a run whose sends are recomputed by hand from the workers' parameters."""
  M, H = 2, 2
  codec = quantize.get_codec("fp4_e3m0", block_size=4)
  algo = algorithm.StreamingDiLoCo(toy.loss_fn, optax.adam(1e-2), optax.sgd(0.4), num_workers=M,
                                   inner_steps=H, mesh=mesh_lib.make_mesh(M), codec=codec,
                                   error_feedback=True)   # P = 1, τ = 0
  params = toy.init_params()
  bs = toy.batches(2 * H, M)
  state = algo.init(params)
  flat = lambda tree: np.concatenate([np.asarray(x).reshape(M, -1) for x in jax.tree.leaves(tree)], 1)
  g = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
  bounds = np.cumsum([0] + [x.size for x in jax.tree.leaves(params)])
  # Each leaf is quantized on its own: roundtrip the flat vector leaf by leaf.
  roundtrip = lambda v: np.concatenate([np.asarray(codec.roundtrip(jnp.asarray(v[a:b])))
                                        for a, b in zip(bounds, bounds[1:])])
  residual = np.zeros_like(flat(state.local_params))
  for t, b in enumerate(bs, start=1):
    if t % H == 0:   # see the workers just before the sync: the inner step alone
      step, local, inner_state, _, _ = algo._inner_step(state.step, state.local_params,
                                                    state.inner_opt_state, b)
      workers = flat(local)
      state = state.replace(step=step, local_params=local, inner_opt_state=inner_state)
      f = algo.fragments
      outer_p, local_p = f.select(state.outer_params, 0), f.select(state.local_params, 0)
      res_p = list(state.residual)
      g_new, local_p, opt_p, res_p, rng, _, _ = algo._sync[0](
          outer_p, local_p, state.outer_opt_state[0], res_p, state.rng, algo._everyone)
      state = state.replace(outer_params=f.merge_into(state.outer_params, 0, g_new),
                            local_params=f.merge_into(state.local_params, 0, local_p),
                            outer_opt_state=(opt_p,), residual=tuple(res_p), rng=rng)
      algo.start_at(t + 1)   # the sync above stood in for step(t)
      x = g[None] - workers + residual
      sent = np.stack([roundtrip(x[m]) for m in range(M)])
      np.testing.assert_allclose(flat(state.residual), x - sent, rtol=0, atol=1e-6)
      residual = flat(state.residual)
      g = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(state.outer_params)])
    else:
      state, _ = algo.step(state, b, t)
  assert np.abs(residual).max() > 0


def test_stochastic_rounding_is_independent_per_worker_and_wire_agnostic():
  M = 2
  mesh = mesh_lib.make_mesh(M)
  c = quantize.get_codec("fp4_e3m0", block_size=8, stochastic=True)
  same = np.random.default_rng(3).normal(size=64).astype(np.float32)
  deltas = [jax.device_put(jnp.asarray(np.stack([same, same])), mesh_lib.worker_sharding(mesh, 1))]
  key = jax.random.PRNGKey(11)
  ref = jax.jit(lambda d: collectives.worker_mean(d, c, mesh, wire="reference", rng=key))(deltas)
  packed = jax.jit(lambda d: collectives.worker_mean(d, c, mesh, wire="packed", rng=key))(deltas)
  sent = np.asarray(ref[1][0])
  assert not np.array_equal(sent[0], sent[1])   # identical Δ, independent rounding per worker
  _assert_equal(ref[:2], packed[:2])            # the same keys and codes on both wires


def test_pairwise_cosine_from_mean_and_norms():
  rng = np.random.default_rng(0)
  d = rng.normal(size=(2, 50)).astype(np.float64)
  got = outer.pairwise_cosine([jnp.asarray(d.mean(0))], jnp.asarray((d ** 2).sum(1)))
  want = d[0] @ d[1] / np.linalg.norm(d[0]) / np.linalg.norm(d[1])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  e = rng.normal(size=(3, 50))
  e /= np.linalg.norm(e, axis=1, keepdims=True)   # equal norms: the plain mean of the cosines
  got = outer.pairwise_cosine([jnp.asarray(e.mean(0))], jnp.asarray((e ** 2).sum(1)))
  want = np.mean([e[i] @ e[j] for i in range(3) for j in range(3) if i != j])
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_reference_wire_moves_only_the_fp32_all_reduce():
  """DiLoCo's fp32 sync: the only non-scalar collective is the all-reduce of the outer gradient
  (no worker's full Δ is gathered for diagnostics), and it moves what bits_sent reports."""
  M = 4
  algo = _streaming(M, 4, layers=2)   # P = 2, τ = 0
  state = algo.init(toy.init_params())
  f = algo.fragments
  args = (f.select(state.outer_params, 0), f.select(state.local_params, 0),
          state.outer_opt_state[0], [], state.rng, algo._everyone)
  hlo = algo._sync[0].lower(*args).compile().as_text()
  for shape in re.findall(r"= (\w+\[[\d,]*\])\{[\d,]*\} all-gather\(", hlo):
    dims = shape.split("[")[1]
    assert int(np.prod([int(x) for x in re.findall(r"\d+", dims)] or [1])) <= M, shape
  reduces = re.findall(r"= \(?(.*?)\)? all-reduce\(", hlo)
  sizes = [int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
           for r in reduces for dims in re.findall(r"f32\[([\d,]*)\]", r)]
  shapes = [x.shape for x in f.select(toy.init_params(), 0)]
  # The fragment's fp32 outer gradient, leaf by leaf and once; the rest are scalars.
  assert sorted(n for n in sizes if n > 1) == sorted(int(np.prod(s)) for s in shapes if s)
  assert algo.bits_sent(4) == sum(2 * (M - 1) * int(np.prod(s)) * 32 // M for s in shapes)
