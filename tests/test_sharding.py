"""Sharding inside a worker (FSDP over `data`, tensor parallelism over `model`) on 8 simulated
devices: the rule table, the spec and shard shape of every state field, equivalence with the
replicated layout, collectives that stay inside a worker, memory, recompiles, checkpoints
across meshes and the outer state offloaded to host memory."""

import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from diloco_jax import (algorithm, checkpoint, collectives, fragments, inner, mesh as mesh_lib,
                        model as model_lib, outer, quantize, sharding)
from tests.test_algorithm import COMPILES

CFG = model_lib.config_from_preset("tiny", vocab_size=128)   # 2 blocks, D=64, 4 heads, F=256
PARAMS = model_lib.init_params(CFG, jax.random.PRNGKey(0))
M, H, B, L = 2, 6, 8, 32
MESHES = {"replicated": (1, 1), "fsdp": (4, 1), "fsdp_tp": (2, 2)}   # (data, model)
W, Dm = mesh_lib.WORKER, mesh_lib.DATA
Md = mesh_lib.MODEL


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, CFG.vocab_size, size=(M, B, L + 1)).astype(np.int32) for _ in range(n)]


BATCHES = _batches(3 * H)


def _mesh(kind):
  data, model = MESHES[kind]
  return mesh_lib.make_mesh(M, data=data, model=model)


def _specs(mesh, kind):
  return sharding.param_specs(mesh, PARAMS, None if kind == "replicated"
                              else model_lib.logical_axes(PARAMS))


def _streaming(kind, *, codec="fp4_e3m0", block=16, tau=1, offload=False, error_feedback=False,
               wire="reference", alpha=0.5,
               frags=lambda p: fragments.by_blocks(p, layers_per_fragment=1)):   # P = 3
  mesh = _mesh(kind)
  return algorithm.StreamingDiLoCo(
      functools.partial(model_lib.loss_fn, CFG, constrain=sharding.activation_constraint(mesh)),
      inner.inner_optimizer(3e-3, 3 * H, warmup_steps=2),
      outer.outer_optimizer("nesterov", 0.4, 0.9), num_workers=M, inner_steps=H, mesh=mesh,
      fragments=frags, overlap_steps=tau, merge_alpha=alpha, codec=quantize.get_codec(codec, block),
      param_specs=_specs(mesh, kind), offload_outer=offload, error_feedback=error_feedback,
      wire=wire)


def _init(algo):
  params = jax.jit(lambda x: x, out_shardings=sharding.named(algo.mesh, algo._specs_arg))(PARAMS)
  return algo.init(params, jax.random.PRNGKey(1))


_SHARED = {}


def _shared(kind, **kw):
  """One algorithm per configuration for the whole module, and a fresh copy of its initial state:
  most tests here only run a configuration another test also runs, and an algorithm compiles
  its programs once (`init` would rebind it and start from fresh programs, so the initial state
  is kept on the host and put back; the programs donate their arguments). The tests that check
  what compiles build their own (`_streaming`)."""
  bound = inspect.signature(_streaming).bind(kind, **kw)
  bound.apply_defaults()
  key = tuple(bound.arguments.items())
  if key not in _SHARED:
    algo = _streaming(kind, **kw)
    _SHARED[key] = algo, jax.device_get(_init(algo))
  algo, host = _SHARED[key]
  return algo, jax.device_put(host, algo.state_shardings())


def _run(algo, state, start, stop):
  metrics = None
  if isinstance(algo, algorithm.StreamingDiLoCo):   # DataParallel has no schedule to follow
    algo.start_at(start)   # a shared algorithm (`_shared`) runs again from another state
  for t in range(start, stop + 1):
    batch = jax.device_put(BATCHES[t - 1], mesh_lib.batch_sharding(algo.mesh))
    state, metrics = algo.step(state, batch, t)
  return state, metrics


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _rel(a, b):
  a, b = _host(a), _host(b)
  num = sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b, strict=True))
  return math.sqrt(num / sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b))


def _assert_equal(a, b):
  for x, y in zip(_host(a), _host(b), strict=True):
    np.testing.assert_array_equal(x, y)


# -------------------------------------------------------------------------------- the rules
def test_rule_table_gives_fsdp_and_tensor_parallel_specs():
  mesh = _mesh("fsdp_tp")
  specs = _specs(mesh, "fsdp_tp")
  blk = specs["blocks"][0]
  assert specs["embed"] == P(Md, Dm)                 # [vocab, embed]
  assert blk["attn"]["wq"] == P(Dm, Md)              # [embed, heads, head_dim]
  assert blk["attn"]["wo"] == P(Md, None, Dm)        # [heads, head_dim, embed]
  assert blk["mlp"]["w_up"] == blk["mlp"]["w_gate"] == P(Dm, Md)
  assert blk["mlp"]["w_down"] == P(Md, Dm)
  assert blk["attn_norm"]["scale"] == blk["attn"]["q_norm"]["scale"] == P()
  fsdp = _specs(_mesh("fsdp"), "fsdp")   # an axis of size 1 is left out of the spec
  assert fsdp["embed"] == P(None, Dm) and fsdp["blocks"][1]["mlp"]["w_down"] == P(None, Dm)
  assert all(s == P() for s in jax.tree.leaves(_specs(_mesh("replicated"), "replicated"),
                                               is_leaf=sharding.is_spec))


def test_a_dimension_its_axis_does_not_divide_is_one_sentence():
  mesh = mesh_lib.make_mesh(M, model=3)   # 4 heads, 3-way tensor parallelism
  with pytest.raises(ValueError, match=r"the parameter \['blocks'\]\[0\]\['attn'\]\['wk'\] has "
                     r"heads=4 \(model.num_heads\), which mesh.model=3 does not divide"):
    sharding.param_specs(mesh, PARAMS, model_lib.logical_axes(PARAMS))


def test_a_quantization_block_across_two_devices_is_one_sentence():
  with pytest.raises(ValueError, match=r"diloco.codec_block_size=32 must divide the runs of 16 "
                     r"values that each device holds of \['blocks'\]\[0\]\['attn'\]\['wo'\]"):
    _init(_streaming("fsdp", block=32))   # D/4 = 16 values per device in every row of wo


# ------------------------------------------------------------------ every field's layout
@pytest.mark.parametrize("kind", ["fsdp", "fsdp_tp"])
def test_spec_and_shard_shape_of_every_state_field(kind):
  algo = _streaming(kind, error_feedback=True, offload=False)
  state = _init(algo)
  mesh, specs = algo.mesh, algo.specs
  leaf_specs = jax.tree.leaves(specs, is_leaf=sharding.is_spec)
  shapes = [x.shape for x in jax.tree.leaves(PARAMS)]

  def check(x, spec, shape, worker):
    want = sharding.per_worker(spec) if worker else spec
    assert x.sharding.spec == want, (x.shape, x.sharding.spec, want)
    local = sharding.local_shape(shape, spec, mesh)
    assert x.addressable_shards[0].data.shape == ((1,) + local if worker else local)
    assert x.sharding.memory_kind == "device"

  for x, s, shape in zip(jax.tree.leaves(state.local_params), leaf_specs, shapes, strict=True):
    check(x, s, shape, True)
  for x, s, shape in zip(jax.tree.leaves(state.residual), leaf_specs, shapes, strict=True):
    check(x, s, shape, True)
  for x, s, shape in zip(jax.tree.leaves(state.outer_params), leaf_specs, shapes, strict=True):
    check(x, s, shape, False)
  # AdamW: count [M] over workers; mu and nu [M, ...] like the params.
  adam = [x for x in jax.tree.leaves(state.inner_opt_state) if x.ndim > 1]
  assert len(adam) == 2 * len(shapes)
  for x, s, shape in zip(adam, leaf_specs * 2, shapes * 2, strict=True):
    check(x, s, shape, True)
  for p in range(algo.fragments.num_fragments):
    frag_specs, frag_shapes = algo.fragments.select(specs, p), algo.fragments.select(PARAMS, p)
    momentum = jax.tree.leaves(state.outer_opt_state[p])
    for x, s, y in zip(momentum, frag_specs, frag_shapes, strict=True):   # Nesterov's trace
      check(x, s, y.shape, False)
    for x, s, y in zip(state.inflight[p], frag_specs, frag_shapes, strict=True):
      check(x, s, y.shape, False)
  assert state.step.sharding.is_fully_replicated and state.rng.sharding.is_fully_replicated
  # Nothing but the norm scales is whole on a device: bytes per device fall by data·model.
  full = sum(x.nbytes for x in jax.tree.leaves(state.outer_params))
  mine = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.outer_params))
  norms = sum(x.nbytes for k, x in jax.tree_util.tree_flatten_with_path(PARAMS)[0]
              if "scale" in jax.tree_util.keystr(k))
  assert mine == (full - norms) // mesh_lib.devices_per_worker(mesh) + norms


# -------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("kind", ["fsdp", "fsdp_tp"])
def test_three_outer_rounds_fp32_equal_the_replicated_run(kind):
  a, init_a = _shared("replicated", codec="fp32")
  b, init_b = _shared(kind, codec="fp32")
  one_a, _ = _run(a, init_a, 1, H)
  one_b, _ = _run(b, init_b, 1, H)
  assert _rel(one_b.outer_params, one_a.outer_params) <= 1e-6   # one outer round
  three_a, _ = _run(a, one_a, H + 1, 3 * H)
  three_b, _ = _run(b, one_b, H + 1, 3 * H)
  for field in ("outer_params", "local_params", "inner_opt_state"):
    assert _rel(getattr(three_b, field), getattr(three_a, field)) <= 1e-6, field
  # The in-flight Δ = θ_g − θ_m cancels most digits: its error is the params' error, not 1e-6
  # of its own (much smaller) norm.
  delta_err = _rel(three_b.inflight, three_a.inflight) * np.sqrt(sum(
      float(np.sum(x ** 2)) for x in _host(three_a.inflight)))
  assert delta_err <= 1e-6 * np.sqrt(sum(float(np.sum(x ** 2)) for x in _host(three_a.outer_params)))
  assert not np.allclose(_host(three_a.outer_params)[0], _host(PARAMS)[0])   # it trained


@pytest.mark.parametrize("kind", ["fsdp", "fsdp_tp"])
def test_e3m0_programs_equal_the_replicated_layouts_programs(kind):
  """Streaming DiLoCo with τ=1 and E3M0 after two outer rounds under `kind`: every program of the
  third round, given the same values in the replicated layout, returns the same state: the
  sends and receives bit for bit (the quantization blocks are the same on every mesh), the
  inner step to 1e-6 (the partitioned matmuls sum in another order; end to end, E3M0 turns
  such last-bit differences into whole quantization steps where a value sits on a rounding
  boundary, see docs/design.md)."""
  b, init_b = _shared(kind)
  state, _ = _run(b, init_b, 1, 2 * H)
  a, _ = _shared("replicated")
  state_a = jax.device_put(state, a.state_shardings())
  batch = BATCHES[2 * H]
  progs_b = b.programs(state, jax.device_put(batch, mesh_lib.batch_sharding(b.mesh)))
  progs_a = a.programs(state_a, jax.device_put(batch, mesh_lib.batch_sharding(a.mesh)))
  copy = lambda tree: jax.tree.map(jnp.copy, tree)   # the programs donate their arguments
  for (name, fb, args_b), (_, fa, args_a) in zip(progs_b, progs_a, strict=True):
    out_b, out_a = fb(*copy(args_b)), fa(*copy(args_a))
    if name == "inner_step":
      assert _rel(out_b, out_a) <= 1e-6
      continue
    if isinstance(out_b[-1], dict):   # diagnostics: sums over shards, in another order
      for k in out_b[-1]:
        np.testing.assert_allclose(np.asarray(out_b[-1][k]), np.asarray(out_a[-1][k]),
                                   rtol=1e-5, err_msg=k)
      out_b, out_a = out_b[:-1], out_a[:-1]
    _assert_equal(out_b, out_a)


def test_one_fragment_no_overlap_is_plain_diloco_bit_for_bit_under_fsdp_tp():
  """P=1, τ=0, α=0 is DiLoCo: against DiLoCo written out with no fragments or schedule, one
  jitted inner step and one jitted sync of the whole tree, in the same sharded layout."""
  algo = _streaming("fsdp_tp", codec="fp32", tau=0, alpha=0.0, frags=fragments.single)
  state, _ = _run(algo, _init(algo), 1, 2 * H)
  lay, mesh, specs = algo.layout, algo.mesh, algo.specs
  outer_sh = sharding.named(mesh, specs)
  outer_opt_sh = sharding.named(mesh, sharding.opt_state_specs(algo.outer_opt, PARAMS, specs))

  @functools.partial(jax.jit, out_shardings=(lay.local, lay.inner_opt))
  def inner_all(local, opt_state, batch):
    f = lambda p, s, b: inner.worker_step(algo.loss_fn, algo.inner_opt, p, s, b)[:2]
    return jax.vmap(f, spmd_axis_name=mesh_lib.WORKER)(local, opt_state, batch)

  @functools.partial(jax.jit, out_shardings=(outer_sh, outer_opt_sh, lay.local))
  def sync(g, outer_state, local):
    g_leaves, treedef = jax.tree.flatten(g)
    deltas = [a[None] - w for a, w in zip(g_leaves, jax.tree.leaves(local))]
    mean = collectives.worker_mean(deltas, quantize.get_codec("fp32"), mesh,
                                   specs=jax.tree.leaves(specs, is_leaf=sharding.is_spec))[0]
    upd, outer_state = algo.outer_opt.update(jax.tree.unflatten(treedef, mean), outer_state, g)
    g = optax.apply_updates(g, upd)
    return g, outer_state, jax.tree.map(lambda x, w: jnp.broadcast_to(x[None], w.shape), g, local)

  g = jax.device_put(PARAMS, outer_sh)
  local = jax.jit(lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x[None], (M,) + x.shape), p),
                  out_shardings=lay.local)(g)
  opt_state = jax.jit(jax.vmap(algo.inner_opt.init), out_shardings=lay.inner_opt)(local)
  outer_state = jax.jit(algo.outer_opt.init, out_shardings=outer_opt_sh)(g)
  for t in range(1, 2 * H + 1):
    local, opt_state = inner_all(local, opt_state, jax.device_put(
        BATCHES[t - 1], mesh_lib.batch_sharding(mesh)))
    if t % H == 0:
      g, outer_state, local = sync(g, outer_state, local)
  _assert_equal(state.outer_params, g)
  _assert_equal(state.local_params, local)


@pytest.mark.parametrize("codec", ["fp4_e3m0", "fp32"])
def test_packed_wire_equals_reference_under_fsdp_tp(codec):
  a, _ = _run(*_shared("fsdp_tp", codec=codec), 1, H + 1)
  b, _ = _run(*_shared("fsdp_tp", codec=codec, wire="packed"), 1, H + 1)
  _assert_equal(a, b)


# ------------------------------------------------------------------- collectives and HLO
def _groups(line: str, mesh) -> list[list[int]]:
  """The device groups of one HLO collective, in every replica_groups syntax XLA prints."""
  n = mesh.devices.size
  if m := re.search(r"source_target_pairs=\{(.*?)\}\}?,", line):
    return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(0))]
  if m := re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line):
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
    ids = np.arange(n).reshape([int(x) for x in m.group(3).split(",")])
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                    r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}", line):
    names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    shape = [int(s) for _, s in names]
    ids = np.arange(n)
    if m.group(2):
      ids = ids.reshape([int(x) for x in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(shape)
    axes = [i for i, (a, _) in enumerate(names) if f"'{a}'" in m.group(4)]
    rest = [i for i in range(len(shape)) if i not in axes]
    return ids.transpose(rest + axes).reshape(-1, math.prod(shape[i] for i in axes)).tolist()
  raise AssertionError(f"cannot read the groups of {line[:200]}")


_COLLECTIVE = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")


def _collective_groups(hlo: str, mesh):
  return [(m.group(1), _groups(line, mesh)) for line in hlo.splitlines()
          if (m := _COLLECTIVE.search(line))]


@pytest.mark.parametrize("kind", ["fsdp_tp"])   # data and model axes both split
def test_collectives_cross_workers_only_in_the_sync_and_only_over_the_worker_axis(kind):
  algo, state = _shared(kind)
  per_worker = mesh_lib.devices_per_worker(algo.mesh)
  batch = jax.ShapeDtypeStruct((M, B, L + 1), jnp.int32,
                               sharding=mesh_lib.batch_sharding(algo.mesh))
  # Partition i of a program is device mesh.devices.flat[i]; worker = i // devices per worker.
  for name, fn, args in algo.programs(state, batch):
    found = _collective_groups(fn.lower(*args).compile().as_text(), algo.mesh)
    # The receive (outer step and merge) is elementwise on each shard: no collective at all.
    assert bool(found) == (not name.startswith("receive")), (name, found)
    for op, groups in found:
      for g in groups:
        workers = {i // per_worker for i in g}
        if name == "inner_step":   # nothing leaves a worker
          assert len(workers) == 1, (name, op, g)
        elif len(workers) > 1:     # a sync: one device of each worker, at the same position
          assert len(workers) == len(g) == M and len({i % per_worker for i in g}) == 1, (op, g)


def test_packed_bits_equal_what_the_hlo_moves_over_the_worker_axis():
  algo, state = _shared("fsdp_tp", wire="packed")
  per_worker = mesh_lib.devices_per_worker(algo.mesh)
  f = algo.fragments
  for p in range(f.num_fragments):
    args = (f.select(state.outer_params, p), f.select(state.local_params, p), [], state.rng,
            algo._everyone)
    hlo = algo._send[p].lower(*args).compile().as_text()
    moved = 0
    for line in hlo.splitlines():
      if not (m := re.search(r"= (\w+)\[([\d,]*)\]\{[\d,]*\} all-gather\(", line)):
        continue
      if len({i // per_worker for i in _groups(line, algo.mesh)[0]}) == 1:
        continue   # inside a worker (none expected, but not the wire's)
      assert m.group(1) in ("u8", "f32"), line   # packed codes and block scales only
      out_bits = math.prod(int(d) for d in m.group(2).split(",")) * {"u8": 8, "f32": 32}[m.group(1)]
      moved += per_worker * (M - 1) * out_bits // M   # each device forwards M−1 of M parts
    assert moved == algo.fragment_bits[p] > 0
    shapes = [x.shape for x in f.select(PARAMS, p)]
    assert algo.fragment_bits[p] == collectives.bits_per_worker(
        shapes, algo.codec, M, "packed", f.select(algo.specs, p), algo.mesh)


@pytest.mark.parametrize("kind", ["fsdp", "fsdp_tp"])
def test_inner_step_argument_bytes_per_device_fall_by_data_times_model(kind):
  def arg_bytes(kind):
    algo, state = _shared(kind)
    batch = jax.ShapeDtypeStruct((M, B, L + 1), jnp.int32,
                                 sharding=mesh_lib.batch_sharding(algo.mesh))
    _, fn, args = algo.programs(state, batch)[0]
    return fn.lower(*args).compile().memory_analysis().argument_size_in_bytes
  data, model = MESHES[kind]
  n = data * model
  N = sum(x.size for x in jax.tree.leaves(PARAMS))
  norms = sum(x.size for k, x in jax.tree_util.tree_flatten_with_path(PARAMS)[0]
              if "scale" in jax.tree_util.keystr(k))
  # One worker per device: its params and AdamW moments (fp32), AdamW's and the schedule's
  # int32 counts, the int32 step and its rows of the [B, L+1] int32 batch. Everything but the
  # norm scales (0.1 % of the params) is divided by data·model, the batch by data.
  def expected(n, data):
    return 3 * 4 * ((N - norms) // n + norms) + 2 * 4 + 4 + (B // data) * (L + 1) * 4
  assert arg_bytes("replicated") == expected(1, 1)
  assert arg_bytes(kind) == expected(n, data)


def test_no_recompilation_after_the_first_outer_round_under_fsdp_tp():
  algo = _streaming("fsdp_tp", tau=1)
  state, _ = _run(algo, _init(algo), 1, 2 * H + 1)   # every fragment has sent and merged
  before = COMPILES.n
  state, _ = _run(algo, state, 2 * H + 2, 3 * H)
  jax.block_until_ready(state)
  assert COMPILES.n == before


# ---------------------------------------------------------------- checkpoints across meshes
def test_checkpoint_saved_under_data4_restores_under_data2_and_data1(tmp_path):
  # The same algorithm as the other tests (fsdp is data=4), with the rule table's specs on every
  # mesh (on data=1 they are all P()).
  def fsdp(data):
    MESHES[f"data{data}"] = (data, 1)
    return _shared("fsdp" if data == 4 else f"data{data}")
  a4, init = fsdp(4)
  saved, _ = _run(a4, init, 1, H + 1)   # fragment 0's mean in flight
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(H + 1, saved, {"note": "data=4"})
  ckpt.wait()
  saved = jax.device_get(saved)   # host copies: the runs below donate their device buffers
  uninterrupted, _ = _run(a4, jax.device_put(saved, a4.state_shardings()), H + 2, 2 * H + 2)
  for data in (4, 2, 1):
    algo, like = fsdp(data)
    restored, host = ckpt.restore(H + 1, like)
    assert host.pop("state_layout") == checkpoint._layout(like)   # added by every save
    assert host == {"note": "data=4"}
    _assert_equal(restored, saved)   # the same values, whatever the mesh
    assert restored.local_params["embed"].sharding == like.local_params["embed"].sharding
    resumed, _ = _run(algo, restored, H + 2, 2 * H + 2)
    # The resumed run equals the same mesh's run from the same state, bit for bit; on the
    # saving mesh that is the uninterrupted run itself.
    if data == 4:
      _assert_equal(resumed, uninterrupted)
      continue
    same, _ = _run(algo, jax.device_put(saved, algo.state_shardings()), H + 2, 2 * H + 2)
    _assert_equal(resumed, same)
  ckpt.close()


# ------------------------------------------------------------------- outer state on the host
@pytest.mark.parametrize("tau", [0, 1])
def test_offloaded_outer_state_gives_the_same_numbers(tau):
  a, _ = _run(*_shared("fsdp", tau=tau), 1, 2 * H + 1)
  offloaded, init = _shared("fsdp", tau=tau, offload=True)
  b, _ = _run(offloaded, init, 1, 2 * H + 1)
  _assert_equal(a, b)
  host = [b.outer_params, b.outer_opt_state, b.inflight]
  assert {x.sharding.memory_kind for x in jax.tree.leaves(host)} == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(
      [b.local_params, b.inner_opt_state])} == {"device"}
  evaluated = offloaded.eval_params(b)
  assert {x.sharding.memory_kind for x in jax.tree.leaves(evaluated)} == {"device"}
  _assert_equal(evaluated, a.outer_params)


# ------------------------------------------------------------------------- data-parallel
@pytest.mark.parametrize("kind", ["fsdp_tp"])
def test_data_parallel_fsdp_equals_replicated(kind):
  def dp(kind):
    mesh = _mesh(kind)
    return algorithm.DataParallel(
        functools.partial(model_lib.loss_fn, CFG, constrain=sharding.activation_constraint(mesh)),
        inner.inner_optimizer(3e-3, H, warmup_steps=2), num_workers=M, mesh=mesh,
        param_specs=_specs(mesh, kind))
  states = []
  for k in ("replicated", kind):
    algo = dp(k)
    state, _ = _run(algo, algo.init(PARAMS), 1, H)
    states.append(state)
  assert _rel(states[1].params, states[0].params) <= 1e-6
  specs = jax.tree.leaves(_specs(_mesh(kind), kind), is_leaf=sharding.is_spec)
  assert [x.sharding.spec for x in jax.tree.leaves(states[1].params)] == specs
