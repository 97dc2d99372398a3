"""DiLoCo and Streaming DiLoCo as a model-agnostic state and step (SPEC §1–2, Algorithm 2).

    algo = StreamingDiLoCo(loss_fn, inner_opt, outer_opt, num_workers=M, inner_steps=H, mesh=mesh)
    state = algo.init(params, rng)              # one params pytree -> M stacked worker copies
    for t in range(1, T + 1):                   # t: global inner-step counter, starts at 1
      state, metrics = algo.step(state, batch_MxB..., t)
    outer = algo.eval_params(state)

`step` is host-side Python over a small fixed set of jitted programs: one inner step for all
workers (vmapped over the worker axis), and per fragment p a *send* (Δ_p = mean_m Q(θ_{g,p} − θ_{m,p}),
the all-reduce) and a *receive* (θ_{g,p} ← OuterOpt_p(θ_{g,p}, Δ_p); θ_{m,p} ← α·θ_{m,p} + (1−α)·θ_{g,p}).
The schedule (which fragment sends/receives at t) is static Python, so nothing recompiles after
the first H steps. With one fragment, τ=0 and α=0 this is DiLoCo (Algorithm 1); `DiLoCo(...)`
is that special case.

`DataParallel` is the baseline: one model, gradients averaged over all workers every step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diloco_jax import checks, collectives, fragments as fragments_lib, inner, mesh as mesh_lib
from diloco_jax import faults as faults_lib, outer
from diloco_jax import sharding
from diloco_jax.quantize import Codec, get_codec

PyTree = Any
LossFn = Callable[[PyTree, jax.Array], tuple[jax.Array, dict]]


class DilocoState(struct.PyTreeNode):
  """Everything a (Streaming) DiLoCo run needs to continue, bit for bit.

  Fields (M workers, P fragments). Shardings come from the params' specs (`sharding.py`): a leaf
  with spec S is `P(WORKER, *S)` in the per-worker fields and `P(*S)` in the outer ones, which are
  replicated over workers and, with `offload_outer`, live in host memory (pinned_host):
    step:            int32 [] — inner steps completed (t of the last step).
    local_params:    params pytree, leaves [M, ...] — θ_m, each worker's own parameters.
    inner_opt_state: optax state, leaves [M, ...] — each worker's AdamW state (never communicated).
    outer_params:    params pytree, no worker dim — θ_g, the pure outer copy (before any α-mixing).
    outer_opt_state: tuple of P optax states, fragment p's over the list of its leaves.
    inflight:        tuple of P lists of fp32 leaves (no worker dim) — the all-reduced Δ_p sent and
                     not yet merged; empty tuple when τ=0 (send and receive are one program).
                     With a one-round delay (`delay`), the mean sent at the fragment's last
                     sync, applied at its next one.
    residual:        list of fp32 leaves [M, ...] — error-feedback quantization residuals, or ().
    sent:            eager updates only, else (): tuple of P lists of fp32 leaves [M, ...] — what
                     each worker put into the in-flight mean, Q(Δ_{m,p}(r−1)).
    status:          tuple of P pairs (who, k) from fragment p's latest sync, what its receives
                     act on: who fp32 [M] (split over workers) is 1 in the mean, 0 absent
                     (dropped or down, `faults`), −1 quarantined (its Δ had a NaN or inf); k
                     fp32 [] (replicated) the workers in the mean, so a receive needs no
                     collective to know whether anyone was. () with a delay.
    rng:             PRNG key for stochastic rounding.

  With eager updates every worker keeps its own outer copy and outer optimizer state (leaves
  [M, ...] in `outer_params` and `outer_opt_state`): each applies its own proxy Δ̂_m.
  """

  step: jax.Array
  local_params: PyTree
  inner_opt_state: PyTree
  outer_params: PyTree
  outer_opt_state: tuple
  inflight: tuple
  residual: tuple
  sent: tuple
  status: tuple
  rng: jax.Array


# How a sync's all-reduce meets the outer step (SPEC §5). "none": the mean is applied when it
# arrives, τ steps after the send (Algorithm 2). "naive" and "eager": the all-reduce overlaps a
# whole round of H steps, so the mean sent at a fragment's round r is applied at its round r+1;
# "naive" applies that one-round-stale mean as it is, "eager" a proxy built from the worker's
# own fresh Δ and the others' stale ones (outer.eager_proxy).
DELAYS = ("none", "naive", "eager")


class StreamingDiLoCo:
  """Algorithm 2 of Streaming DiLoCo over M workers (see module docstring).

  Args:
    loss_fn: (params, batch_BxL) -> (scalar loss, aux dict), for ONE worker.
    inner_opt: the per-worker optimizer (AdamW in the papers).
    outer_opt: the outer optimizer (Nesterov SGD), one state per fragment.
    num_workers: M.
    inner_steps: H, inner steps between two syncs of the same fragment.
    mesh: a (worker, data, model) mesh; default: all devices via mesh.make_mesh.
    fragments: a `fragments.Fragments` for the params, or a callable params -> Fragments;
      default: one fragment (DiLoCo).
    overlap_steps: τ, inner steps between a fragment's send and its merge (0 ≤ τ < H); or one τ
      per worker (heterogeneous slack: worker m merges τ_m steps after the send).
    merge_alpha: α, the weight of the local parameters in the merge (0: take the outer copy).
    codec: a `quantize.Codec` (or its name) for the outer gradients on the wire; default fp32.
    wire: "reference" (quantize → dequantize → fp32 mean) or "packed" (the packed low-bit
      payload crosses the worker axis; see collectives.py).
    error_feedback: keep each worker's quantization residual and add it to its next Δ.
    max_steps_in_flight: how far the host may run ahead of the device (see `DispatchBound`).
    param_specs: a PartitionSpec per params leaf (no worker axis; `sharding.param_specs`), or a
      callable params -> specs; default: every leaf replicated inside a worker.
    offload_outer: keep the outer copy, the outer optimizer state and the in-flight outer
      gradients in host memory (pinned_host); each send/receive brings only its fragment to the
      device (the schedule is static, so only that fragment is ever needed there).
    sync_every: {fragment name: period}: fragments synced every k inner steps (k dividing H)
      instead of every H, outside the staggering (e.g. {"router": 10} with the MoE routers split
      into their own fragment by `fragments.split_out`); default: every fragment every H.
    delay: "none", or "naive" / "eager": the outer all-reduce overlaps a whole round (see
      DELAYS and docs/design.md "Eager updates"); needs τ = 0 and no offloading.
    faults: a `faults.FaultSchedule`: which workers report at each sync (dropped outer
      gradients, outages) and when a worker rejoins; default: everyone, always.
    quarantine: a worker whose Δ_p has a NaN or inf is left out of that sync's mean and
      restarted from θ_g with fresh Adam moments (the run goes on; `quarantined/p` counts it).
  """

  def __init__(self, loss_fn: LossFn, inner_opt: optax.GradientTransformation,
               outer_opt: optax.GradientTransformation, *, num_workers: int, inner_steps: int,
               mesh: Mesh | None = None, fragments=None, overlap_steps: int | Sequence[int] = 0,
               merge_alpha: float = 0.0, codec: Codec | str = "fp32", wire: str = "reference",
               error_feedback: bool = False, max_steps_in_flight: int = 2,
               param_specs=None, offload_outer: bool = False, sync_every=None,
               delay: str = "none", faults: faults_lib.FaultSchedule | None = None,
               quarantine: bool = True):
    num_workers = checks.integer("num_workers (M)", num_workers, 1)
    inner_steps = checks.integer("inner_steps (H)", inner_steps, 1)
    merge_alpha = checks.real("merge_alpha (α)", merge_alpha, 0.0, 1.0)
    if wire not in collectives.WIRES:
      raise ValueError(f"diloco.wire must be one of {collectives.WIRES}, got {wire!r}")
    is_int = lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool)
    taus = ((overlap_steps,) * num_workers if is_int(overlap_steps)
            else tuple(overlap_steps) if isinstance(overlap_steps, (tuple, list)) else ())
    if len(taus) != num_workers or not all(is_int(x) and 0 <= x < inner_steps for x in taus):
      raise ValueError(f"diloco.overlap_steps (τ) must be an integer, or one per worker "
                       f"(M={num_workers}), each with 0 <= τ < H={inner_steps}; got {overlap_steps!r}")
    taus = tuple(int(x) for x in taus)
    if delay not in DELAYS:
      raise ValueError(f"the outer delay must be one of {DELAYS}, got {delay!r}")
    if delay != "none" and (any(taus) or offload_outer):
      raise ValueError("diloco.eager and diloco.delayed overlap the all-reduce with a whole "
                       "outer round (H steps); they need diloco.overlap_steps=0 for every "
                       "worker and diloco.offload_outer=False")
    if faults is not None and faults.num_workers != num_workers:
      raise ValueError(f"the fault schedule is for {faults.num_workers} workers, not M={num_workers}")
    if delay != "none" and faults is not None and faults.active:
      raise ValueError("diloco.drop_prob and diloco.outages need the outer step without a "
                       "one-round delay (diloco.eager and diloco.delayed off)")
    self.faults = faults if faults is not None and faults.active else None
    # The delayed variants keep no per-sync status (their bookkeeping assumes every worker).
    self.quarantine = bool(quarantine) and delay == "none"
    self.delay = delay
    self.loss_fn = loss_fn
    self.inner_opt = inner_opt
    self.outer_opt = outer_opt
    self.M = num_workers
    self.H = inner_steps
    self.taus = taus                 # τ_m per worker
    self.tau_first = min(taus)       # the outer step happens at the first merge
    self.alpha = float(merge_alpha)
    self.codec = get_codec(codec) if isinstance(codec, str) else codec
    self.wire = wire
    self.error_feedback = error_feedback
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(num_workers)
    self._bound = DispatchBound(max_steps_in_flight)
    self._fragments_arg = fragments
    self._specs_arg = param_specs
    self.offload_outer = bool(offload_outer)
    self._sync_every = dict(sync_every or {})
    self.fragments: fragments_lib.Fragments | None = None
    self.schedule: fragments_lib.Schedule | None = None

  # ----------------------------------------------------------------------------------- set-up
  def bind(self, params: PyTree) -> None:
    """Fixes the fragments, the schedule and the state's layout from the params' structure
    (static Python; `params` may be abstract). `init` calls it; `aot` calls it alone."""
    # A re-init (possibly with another params structure) starts from fresh programs.
    for name in ("_inner_step", "_sync", "_flush", "_send", "_receive_first", "_receive_late",
                 "_to_device_copy", "_outer_mean", "_restart", "_everyone"):
      self.__dict__.pop(name, None)
    self._last_t = None
    self._memo = {}   # the delayed syncs' programs, by (kind, fragment, static flags)
    self._bound.reset()
    f = self._fragments_arg
    if f is None:
      f = fragments_lib.single(params)
    elif callable(f) and not isinstance(f, fragments_lib.Fragments):
      f = f(params)
    self.fragments = f
    self.fragment_numel = f.sizes(params)
    unknown = sorted(set(self._sync_every) - set(f.names))
    if unknown:
      raise ValueError(f"sync_every names fragments {unknown} that do not exist; the fragments "
                       f"are {list(f.names)}")
    self.schedule = fragments_lib.Schedule(
        H=self.H, P=f.num_fragments, tau=max(self.taus),
        every=tuple(self._sync_every.get(n, 0) for n in f.names) if self._sync_every else ())
    specs = self._specs_arg(params) if callable(self._specs_arg) else self._specs_arg
    self.specs = sharding.param_specs(self.mesh, params, None) if specs is None else specs
    self.layout = _Layout.build(self, params)
    collectives.check_blocks(params, self.specs, self.mesh, self.codec)
    # Bits one worker sends for each fragment's sync (static: shapes, specs and the mesh).
    # With k of the M workers in a sync (`faults`), each of the k sends the k-worker payload.
    self.fragment_bits_k = tuple(tuple(0 if k < 2 else collectives.bits_per_worker(
        [x.shape for x in f.select(params, p)], self.codec, k, self.wire,
        f.select(self.specs, p), self.mesh) for k in range(self.M + 1))
        for p in range(f.num_fragments))
    self.fragment_bits = tuple(b[self.M] for b in self.fragment_bits_k)

  def init(self, params: PyTree, rng: jax.Array | None = None) -> DilocoState:
    """Every worker starts from the same `params`; θ_g = params; outer states per fragment.

    Built under jit straight into the state's layout (`self.layout`): `params` may be sharded
    by its specs already, and no device ever holds more than its shard of any field."""
    self.bind(params)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    f = self.fragments

    def build(params, rng):
      stack = lambda x: jnp.broadcast_to(x[None], (self.M,) + x.shape)
      local = jax.tree.map(stack, params)
      inner_state = jax.vmap(self.inner_opt.init)(local)
      eager = self.delay == "eager"
      outer_params = local if eager else params   # eager: one outer copy per worker
      outer_init = jax.vmap(self.outer_opt.init) if eager else self.outer_opt.init
      outer_states = tuple(outer_init(f.select(outer_params, p)) for p in range(f.num_fragments))
      zeros = lambda lead: tuple([jnp.zeros(lead + x.shape, jnp.float32)
                                  for x in f.select(params, p)] for p in range(f.num_fragments))
      inflight = zeros(()) if self._has_inflight else ()
      residual = tuple(jnp.zeros((self.M,) + x.shape, jnp.float32)
                       for x in jax.tree.leaves(params)) if self.error_feedback else ()
      return DilocoState(step=jnp.zeros((), jnp.int32), local_params=local,
                         inner_opt_state=inner_state, outer_params=outer_params,
                         outer_opt_state=outer_states, inflight=inflight, residual=residual,
                         sent=zeros((self.M,)) if eager else (),
                         status=tuple((jnp.ones((self.M,), jnp.float32), jnp.float32(self.M))
                                      for _ in range(f.num_fragments))
                         if self.delay == "none" else (), rng=rng)

    return jax.jit(build, out_shardings=self.layout.home_state())(params, rng)

  def start_at(self, t: int) -> None:
    """The next `step` call is inner step t (1-based): for another run of this object from a
    state it did not produce step by step (a restored checkpoint, a notebook's second run).
    `step` otherwise refuses a t that does not follow the previous call's."""
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
      raise ValueError(f"start_at: t must be an integer >= 1, got {t!r}")
    self._last_t = int(t) - 1

  @property
  def _has_inflight(self) -> bool:
    """Whether means wait between programs: τ ≥ 1, or a one-round delay."""
    return self.tau_first > 0 or self.delay != "none"

  def state_shardings(self) -> DilocoState:
    """The sharding of every state field (where it lives between programs), after init."""
    return self.layout.home_state()

  # ----------------------------------------------------------------------------- the programs
  # Each program takes only what it reads, so a send in flight is not an input of the next inner
  # step: the host dispatches it and goes on dispatching inner steps (DESIGN "Sync and overlap").
  @functools.cached_property
  def _inner_step(self):
    all_workers = worker_steps(self.loss_fn, self.inner_opt, self.mesh, self.M)
    lay = self.layout

    # Every program pins its outputs' shardings (out_shardings: the state's layout), so the
    # layout never changes between programs and nothing recompiles.
    def step(t, local, opt_state, batch_MxB):
      local, opt_state, loss_M, aux_M = all_workers(local, opt_state, batch_MxB)
      return t + 1, local, opt_state, loss_M, aux_M

    # The loss function's aux (one [M, ...] array per entry) shares the loss's sharding.
    return jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=(
        lay.repl, lay.local, lay.inner_opt, lay.worker_vector, lay.worker_vector))

  def _reduce(self, p: int, outer_p: list, local_p: list, residual_p: list, rng, mask):
    """The send: Δ_p = mean Q(θ_{g,p} − θ_{m,p} [+ residual]) in fp32 over the workers that
    report (`mask`) with finite values; returns (Δ_p, residuals, rng, status, diagnostics)."""
    outer_p = self.layout.to_device(outer_p, self.layout.frag("outer", p))
    mean, _, residual_p, rng, status, metrics = self._all_reduce(
        p, outer.outer_gradient(outer_p, local_p), residual_p, rng, mask)
    return mean, residual_p, rng, status, metrics

  def _all_reduce(self, p: int, delta: list, residual_p: list, rng, mask=None):
    """mean_m Q(Δ_m [+ residual]) in fp32 from the workers' Δ_m [M, ...]; also returns what
    each worker sent (dequantized), the new residuals, the rng, the status and the diagnostics.

    With `mask` (fp32 [M], 1 = reports) the mean is over the reporting workers whose Δ is
    finite (the others' Δ are zeroed before quantizing, Q(0) = 0, and left out of the count);
    status: 1 in the mean, 0 absent, −1 non-finite (quarantined, with `quarantine`). Without a
    mask (the delayed variants) every worker is in the mean and status is None."""
    rng, sub = jax.random.split(rng)
    if self.error_feedback:
      delta = [d + r for d, r in zip(delta, residual_p)]
    status = count = None
    if mask is not None:
      reports = mask > 0
      finite = functools.reduce(jnp.logical_and, [
          jnp.all(jnp.isfinite(d), axis=tuple(range(1, d.ndim))) for d in delta])
      if not self.quarantine:
        finite = jnp.ones_like(finite)
      included = reports & finite
      who = jnp.where(finite, reports.astype(jnp.float32), -1.0)
      delta = [jnp.where(included.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0) for d in delta]
      count = jnp.sum(included.astype(jnp.float32))
      status = (who, count)
    mean, sent, sq_norms = collectives.worker_mean(delta, self.codec, self.mesh, wire=self.wire,
                                                   rng=sub if self.codec.stochastic else None,
                                                   specs=self.fragments.select(self.specs, p),
                                                   count=count)
    metrics = {f"outer_grad_norm/{p}": inner.global_norm(mean)}
    if self.codec.name != "fp32":
      metrics[f"quant_rel_error/{p}"] = collectives.relative_error(delta, sent)
    if self.error_feedback:
      residual_p = [d - s for d, s in zip(delta, sent)]
    if self.M > 1:   # pairwise cosine of the outer gradients as sent
      metrics[f"outer_grad_cosine/{p}"] = outer.pairwise_cosine(mean, sq_norms, count)
    if status is not None:
      metrics[f"participants/{p}"] = count
      metrics[f"quarantined/{p}"] = jnp.sum((who < 0).astype(jnp.float32))
    return mean, sent, residual_p, rng, status, metrics

  def _send_shardings(self, p: int):
    """out_shardings of a send: (in-flight mean, residuals, rng, status, metrics)."""
    lay = self.layout
    # The status stays split over the workers: each needs only its own (and the count, one
    # scalar all-reduce), so no [M] vector crosses the worker axis.
    return (lay.home_frag("inflight", p), lay.frag("residual", p) if self.error_feedback else [],
            lay.repl, (lay.worker_vector, lay.repl), lay.repl)

  def _merge_workers(self, local_p: list, outer_p: list, d: int, status=None) -> list:
    """θ_{m,p} ← α·θ_{m,p} + (1−α)·θ_{g,p} for the workers with τ_m = d; the others keep theirs.
    A worker that was not in the sync (status ≠ 1) takes θ_{g,p} itself."""
    merged = outer.merge(local_p, outer_p, self.alpha)
    if status is not None and self.alpha != 0.0:   # α = 0: merged is θ_{g,p} already
      restart = outer.merge(local_p, outer_p, 0.0)
      merged = [jnp.where((status[0] == 1).reshape((-1,) + (1,) * (m.ndim - 1)), m, r)
                for m, r in zip(merged, restart)]
    mask = np.array([d is None or tau == d for tau in self.taus])   # None: every worker
    if mask.all():
      return merged
    pick = lambda m, w: jnp.where(mask.reshape((-1,) + (1,) * (w.ndim - 1)), m, w)
    return [pick(m, w) for m, w in zip(merged, local_p)]

  def _outer_step(self, p, outer_p, opt_p, mean, status=None):
    """θ_{g,p} ← OuterOpt_p(θ_{g,p}, Δ_p) on the device (offloaded inputs are brought over);
    skipped (θ_{g,p} and its optimizer state unchanged) if no worker was in the mean."""
    lay = self.layout
    outer_p = lay.to_device(outer_p, lay.frag("outer", p))
    opt_p = lay.to_device(opt_p, lay.outer_opt[p])
    mean = lay.to_device(mean, lay.frag("inflight", p))
    g, new_opt = outer.outer_update(self.outer_opt, outer_p, opt_p, mean)
    if status is None:
      return g, new_opt
    anyone = status[1] > 0
    keep = lambda new, old: jnp.where(anyone, new, old)
    return jax.tree.map(keep, g, outer_p), jax.tree.map(keep, new_opt, opt_p)

  def _blocking_syncs(self, every_worker: bool) -> list:
    """Per fragment p, one program: send, outer step and merge (no overlap). The merge is the
    τ=0 workers' (a regular sync with min τ = 0), or every worker's (the final sync)."""
    lay = self.layout

    def sync(p, outer_p, local_p, opt_p, residual_p, rng, mask):
      mean, residual_p, rng, status, metrics = self._reduce(p, outer_p, local_p, residual_p,
                                                            rng, mask)
      g, opt_p = self._outer_step(p, outer_p, opt_p, mean, status)
      local_p = self._merge_workers(local_p, g, None if every_worker else 0, status)
      return g, local_p, opt_p, residual_p, rng, status, metrics

    return [jax.jit(functools.partial(sync, p), donate_argnums=(0, 1, 2, 3), out_shardings=(
        lay.home_frag("outer", p), lay.frag("local", p), lay.home_outer_opt(p),
        *self._send_shardings(p)[1:])) for p in range(self.fragments.num_fragments)]

  @functools.cached_property
  def _sync(self):
    """min τ = 0: send, outer step and the τ=0 workers' merge of fragment p as one program."""
    return self._blocking_syncs(every_worker=False)

  @functools.cached_property
  def _flush(self):
    """The final sync of fragment p: send, outer step, every worker's merge, blocking."""
    return self._blocking_syncs(every_worker=True)

  @functools.cached_property
  def _send(self):
    return [jax.jit(functools.partial(self._reduce, p), donate_argnums=(2,),
                    out_shardings=self._send_shardings(p))
            for p in range(self.fragments.num_fragments)]

  @functools.cached_property
  def _restart(self):
    """{reset_opt: program}: the workers with who[m] < 0 restart wholly from θ_g (every leaf),
    and with reset_opt also with a fresh inner optimizer state (floating leaves, e.g. Adam's
    moments, as `init` makes them; integer leaves such as the step counts that drive the
    learning-rate schedule and bias correction are kept). Quarantined workers (reset_opt: their
    moments hold the NaN too) and rejoining ones. Nothing is computed when nobody restarts."""
    lay = self.layout

    def restart(reset_opt, local, opt_state, outer_params, who):
      pick = lambda new, old: jnp.where(
          (who < 0).reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype), old)

      def go(local, opt_state):   # offloaded θ_g comes over only when someone restarts
        g = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (self.M,) + x.shape),
                         lay.to_device(outer_params, lay.outer))
        local = jax.tree.map(pick, g, local)
        if reset_opt:
          fresh = jax.vmap(self.inner_opt.init)(local)
          opt_state = jax.tree.map(
              lambda f, o: pick(f, o) if jnp.issubdtype(o.dtype, jnp.floating) else o,
              fresh, opt_state)
        return local, opt_state
      return jax.lax.cond(jnp.any(who < 0), go, lambda a, b: (a, b), local, opt_state)

    return {r: jax.jit(functools.partial(restart, r), donate_argnums=(0, 1),
                       out_shardings=(lay.local, lay.inner_opt)) for r in (False, True)}

  @functools.cached_property
  def _everyone(self):
    """The mask of a sync that every worker reports to (one device array, made once)."""
    return jax.device_put(np.ones(self.M, np.float32), self.layout.repl)

  def _mask(self, t: int, p: int):
    if self.faults is None:
      return self._everyone
    return jax.device_put(self.faults.mask(t, p), self.layout.repl)

  def restart_workers(self, state: DilocoState, workers: Sequence[int],
                      reset_inner_opt: bool = True) -> DilocoState:
    """These workers restart from θ_g (and with `reset_inner_opt`, fresh Adam moments)."""
    who = -np.isin(np.arange(self.M), list(workers)).astype(np.float32)
    return self._restart_workers(state, jax.device_put(who, self.layout.worker_vector),
                                 reset_inner_opt)

  def _restart_workers(self, state: DilocoState, who, reset_opt: bool) -> DilocoState:
    local, opt_state = self._restart[reset_opt](state.local_params, state.inner_opt_state,
                                                state.outer_params, who)
    return state.replace(local_params=local, inner_opt_state=opt_state)

  @functools.cached_property
  def _receive_first(self):
    """At t_send + min τ: the outer step on the in-flight mean, and those workers' merge."""
    lay = self.layout

    def receive(p, outer_p, local_p, opt_p, mean, status):
      g, opt_p = self._outer_step(p, outer_p, opt_p, mean, status)
      return g, self._merge_workers(local_p, g, self.tau_first, status), opt_p
    # The mean is not donated: it stays in state.inflight (a checkpoint may save it) until the
    # fragment's next send overwrites it.
    return [jax.jit(functools.partial(receive, p), donate_argnums=(0, 1, 2), out_shardings=(
        lay.home_frag("outer", p), lay.frag("local", p), lay.home_outer_opt(p)))
            for p in range(self.fragments.num_fragments)]

  @functools.cached_property
  def _receive_late(self):
    """At t_send + τ_m > min τ (heterogeneous slack): worker m merges the already-updated θ_g."""
    lay = self.layout

    def merge(d, p, local_p, g, status):
      return self._merge_workers(local_p, lay.to_device(g, lay.frag("outer", p)), d, status)
    return {(d, p): jax.jit(functools.partial(merge, d, p), donate_argnums=(0,),
                            out_shardings=lay.frag("local", p))
            for d in sorted(set(self.taus)) if d != self.tau_first
            for p in range(self.fragments.num_fragments)}

  # ------------------------------------------- one-round delay: naive and eager (SPEC §5)
  def _delayed_outer_step(self, outer_p, opt_p, grad):
    """The outer step of a delayed sync: on the shared θ_g (naive) or on every worker's own
    outer copy with its own gradient (eager; leaves [M, ...])."""
    if self.delay == "naive":
      return outer.outer_update(self.outer_opt, outer_p, opt_p, grad)
    return jax.vmap(functools.partial(outer.outer_update, self.outer_opt))(outer_p, opt_p, grad)

  def _delayed_merge(self, local_p, g):
    return (outer.merge if self.delay == "naive" else outer.merge_own)(local_p, g, self.alpha)

  def _delta(self, outer_p, local_p):
    """Δ_m = θ_g − θ_m, from the shared outer copy or (eager) from worker m's own."""
    if self.delay == "eager":
      return [g.astype(jnp.float32) - w.astype(jnp.float32) for g, w in zip(outer_p, local_p)]
    return outer.outer_gradient(outer_p, local_p)

  def _delayed_program(self, p: int, first: bool):
    """Fragment p's sync at a round r with the all-reduce overlapping a whole round: sends
    Q(Δ_m(r)) (its mean lands at round r+1), then the outer step on what is known now, then the
    merge, in one program. naive: θ_g ← OuterOpt(θ_g, Δ̄(r−1)), nothing at round 1 (`first`);
    eager: every worker m steps its own copy with Δ̂_m(r) (outer.eager_proxy)."""
    key = ("delayed", p, first)
    if key not in self._memo:
      lay = self.layout

      def sync(outer_p, local_p, opt_p, mean_prev, sent_prev, residual_p, rng):
        delta = self._delta(outer_p, local_p)
        mean, sent, residual_p, rng, _, metrics = self._all_reduce(p, delta, residual_p, rng)
        if self.delay == "eager":
          g, opt_p = self._delayed_outer_step(outer_p, opt_p,
                                              outer.eager_proxy(delta, mean_prev, sent_prev))
        elif first:   # nothing has arrived yet
          g = outer_p
        else:
          g, opt_p = self._delayed_outer_step(outer_p, opt_p, mean_prev)
        eager_sent = sent if self.delay == "eager" else []
        return g, self._delayed_merge(local_p, g), opt_p, mean, eager_sent, residual_p, rng, metrics

      self._memo[key] = jax.jit(sync, donate_argnums=(0, 1, 2, 3, 4, 5), out_shardings=(
          lay.frag("outer", p), lay.frag("local", p), lay.outer_opt[p], lay.frag("inflight", p),
          lay.frag("sent", p) if self.delay == "eager" else [],
          *self._delayed_shardings(p)))
    return self._memo[key]

  def _delayed_final_program(self, p: int, pending: bool, fresh: bool):
    """The final sync of fragment p with a one-round delay, blocking (nothing is left to
    overlap with). With `fresh` (inner steps since the last send) the fresh Δ_m are
    all-reduced at once. naive: the in-flight mean Δ̄(R) lands (if `pending`), then the fresh
    mean, each as its round's outer step. eager: the round that would have come next, Δ̂_m =
    Δ_m/M + the others' part of Δ̄(R), then the others' part of the fresh mean; without fresh
    steps only the others' part of Δ̄(R) remains. With one worker there are no others, so
    eager's final sync is DiLoCo's. Then, if θ_g moved, every worker merges."""
    key = ("final", p, pending, fresh)
    if key not in self._memo:
      lay = self.layout
      eager, M = self.delay == "eager", self.M
      others = lambda mean, sent: [m[None] - q / M for m, q in zip(mean, sent)]

      def final(outer_p, local_p, opt_p, mean_prev, sent_prev, residual_p, rng):
        metrics, g = {}, outer_p
        if fresh:
          delta = self._delta(outer_p, local_p)
          mean, sent, residual_p, rng, _, metrics = self._all_reduce(p, delta, residual_p, rng)
        if eager:
          if fresh:
            g, opt_p = self._delayed_outer_step(g, opt_p, outer.eager_proxy(delta, mean_prev,
                                                                             sent_prev))
          if M > 1:
            g, opt_p = self._delayed_outer_step(
                g, opt_p, others(mean, sent) if fresh else others(mean_prev, sent_prev))
        else:
          if pending:
            g, opt_p = self._delayed_outer_step(g, opt_p, mean_prev)
          if fresh:
            g, opt_p = self._delayed_outer_step(g, opt_p, mean)
        if g is not outer_p:   # an outer step happened (not so for eager, M = 1, sent at T)
          local_p = self._delayed_merge(local_p, g)
        return g, local_p, opt_p, residual_p, rng, metrics

      self._memo[key] = jax.jit(final, donate_argnums=(0, 1, 2, 5), out_shardings=(
          lay.frag("outer", p), lay.frag("local", p), lay.outer_opt[p],
          *self._delayed_shardings(p)))
    return self._memo[key]

  def _delayed_shardings(self, p: int) -> tuple:
    """out_shardings of a delayed program's (residuals, rng, metrics)."""
    residual, rng, _, metrics = self._send_shardings(p)[1:]
    return residual, rng, metrics

  def _delayed_args(self, state: DilocoState, p: int) -> tuple:
    f = self.fragments
    return (f.select(state.outer_params, p), f.select(state.local_params, p),
            state.outer_opt_state[p], state.inflight[p],
            state.sent[p] if self.delay == "eager" else [], self._residual(state, p), state.rng)

  def _delayed_sync(self, state: DilocoState, p: int, t: int) -> tuple[DilocoState, dict]:
    f = self.fragments
    first = self.schedule.last_send(p, t - 1) is None
    g, local_p, opt_p, mean, sent, residual_p, rng, m = self._delayed_program(
        p, first and self.delay == "naive")(*self._delayed_args(state, p))
    state = state.replace(
        outer_params=f.merge_into(state.outer_params, p, g),
        local_params=f.merge_into(state.local_params, p, local_p),
        outer_opt_state=_replace_at(state.outer_opt_state, p, opt_p),
        inflight=_replace_at(state.inflight, p, mean), rng=rng,
        sent=_replace_at(state.sent, p, sent) if self.delay == "eager" else ())
    return self._keep_residual(state, p, residual_p), m

  def _delayed_final(self, state: DilocoState, p: int, t: int) -> tuple[DilocoState, dict]:
    f = self.fragments
    last = self.schedule.last_send(p, t)
    g, local_p, opt_p, residual_p, rng, m = self._delayed_final_program(
        p, last is not None, last != t)(*self._delayed_args(state, p))
    state = state.replace(outer_params=f.merge_into(state.outer_params, p, g),
                          local_params=f.merge_into(state.local_params, p, local_p),
                          outer_opt_state=_replace_at(state.outer_opt_state, p, opt_p), rng=rng)
    return self._keep_residual(state, p, residual_p), m

  # ------------------------------------------------------------------------------- host loop
  def step(self, state: DilocoState, batch_MxB: jax.Array, t: int):
    """Inner step t (1-based) for all workers, then what the static schedule puts at t: merges
    of fragments sent at t − τ_m, then this step's send. Nothing here waits on a device value.

    Returns (state, metrics); metrics are device values (fetch them late to avoid a host sync):
    "loss" [M], "aux" (the loss function's aux dict, leaves [M, ...]) and the sync diagnostics
    of the fragments sent at t.
    """
    if self.schedule is None:
      raise RuntimeError("call init(params) before step()")
    # The schedule is keyed on t, so t must advance one at a time (checked on the host: the
    # first call may start anywhere, e.g. after a restore at state.step = t − 1).
    if self._last_t is not None and t != self._last_t + 1:
      raise ValueError(f"step() got t={t} after t={self._last_t}: t must increase by 1 per call "
                       "(start_at(t) begins another run)")
    self._last_t = t
    self._bound.wait()
    f = self.fragments
    back = self.faults.rejoining(t) if self.faults is not None else ()
    if back:   # back from an outage: restart from θ_g before this inner step
      state = self.restart_workers(state, back, self.faults.reset_inner_opt)
    step, local, inner_state, loss, aux = self._inner_step(state.step, state.local_params,
                                                           state.inner_opt_state, batch_MxB)
    state = state.replace(step=step, local_params=local, inner_opt_state=inner_state)
    self._bound.push(loss)
    metrics = {"loss": loss, "aux": aux}
    for d in sorted(set(self.taus)):   # receives, τ ≥ 1 (a fragment sent at t − d)
      if d == 0 or t - d < 1:
        continue
      for p in self.schedule.sends(t - d):
        state = self._receive(state, p, d)
    for p in self.schedule.sends(t):   # sends
      if self.delay != "none":
        state, m = self._delayed_sync(state, p, t)
      elif self.tau_first == 0:
        state, m = self._blocking_sync(self._sync[p], state, p, t)
      else:
        outer_p, local_p = f.select(state.outer_params, p), f.select(state.local_params, p)
        mean, residual_p, rng, status, m = self._send[p](
            outer_p, local_p, self._residual(state, p), state.rng, self._mask(t, p))
        state = self._keep_residual(state.replace(
            inflight=_replace_at(state.inflight, p, mean), rng=rng,
            status=_replace_at(state.status, p, status)), p, residual_p)
      metrics.update(m)
    return state, metrics

  def final_sync(self, state: DilocoState, t: int) -> tuple[DilocoState, dict]:
    """The end of a run after inner step t (`train.final_sync`): every fragment's outer copy
    θ_{g,p} takes in every inner step up to t, so the evaluated θ_g is not up to H steps stale.

    First the receives still pending at t (fragments sent at s > t − τ_m) complete, as they
    would have τ_m steps later (the outer step on the in-flight mean, then the merges). Then
    every fragment that has trained since its latest send (sent before t, or never) syncs once
    more, blocking: Δ_p = mean_m Q(θ_{g,p} − θ_{m,p}), θ_{g,p} ← OuterOpt_p(θ_{g,p}, Δ_p), and
    every worker merges with α. A fragment sent at t itself has nothing new and is not sent
    again (an outer step on Δ = 0 would still move θ_g by the momentum). What this sends:
    `final_bits(t)`. Returns (state, that sync's diagnostics)."""
    if self.schedule is None:
      raise RuntimeError("call init(params) before final_sync()")
    metrics = {}
    if self.delay != "none":   # every fragment has a mean in flight once it has been sent
      for p in range(self.fragments.num_fragments):
        state, m = self._delayed_final(state, p, t)
        metrics.update(m)
      return state, metrics
    for p in self.schedule.in_flight(t):   # oldest send first, as they would have landed
      s = self.schedule.last_send(p, t)
      for d in sorted(set(self.taus)):
        if d and s + d > t:
          state = self._receive(state, p, d)
    for p in self._flushed(t):
      state, m = self._blocking_sync(self._flush[p], state, p, t)
      metrics.update(m)
    return state, metrics

  def _flushed(self, t: int) -> tuple[int, ...]:
    """The fragments the final sync after step t sends: those not sent at t itself."""
    return tuple(p for p in range(self.fragments.num_fragments)
                 if self.schedule.last_send(p, t) != t)

  def final_bits(self, t: int):
    """Bits one worker sends in the final sync after step t: one more payload of each fragment
    not sent at t (the pending receives were counted when they were sent)."""
    return sum(self._sync_bits(t, p) for p in self._flushed(t))

  def _sync_bits(self, t: int, p: int):
    """Bits per worker of fragment p's sync at step t: every worker's payload, or with `faults`
    the mean over the M workers of what each sent (k reporting workers each send the k-worker
    payload; absent ones send nothing). A quarantined worker's payload did cross the wire."""
    if self.faults is None:
      return self.fragment_bits[p]
    k = int(self.faults.mask(t, p).sum())
    total = k * self.fragment_bits_k[p][k]
    return total // self.M if total % self.M == 0 else total / self.M

  def _residual(self, state: DilocoState, p: int) -> list:
    f = self.fragments
    return [state.residual[i] for i in f.leaf_indices(p)] if self.error_feedback else []

  def _keep_residual(self, state: DilocoState, p: int, residual_p: list) -> DilocoState:
    if not self.error_feedback:
      return state
    return state.replace(residual=_scatter(state.residual, self.fragments.leaf_indices(p),
                                           residual_p))

  def _receive(self, state: DilocoState, p: int, d: int) -> DilocoState:
    """Fragment p's receive by the workers with τ_m = d: the first one (min τ) also makes the
    outer step on the in-flight mean; later ones merge the already-updated θ_{g,p}."""
    f = self.fragments
    local_p = f.select(state.local_params, p)
    if d == self.tau_first:
      g, local_p, opt_p = self._receive_first[p](
          f.select(state.outer_params, p), local_p, state.outer_opt_state[p], state.inflight[p],
          state.status[p])
      state = state.replace(outer_params=f.merge_into(state.outer_params, p, g),
                            outer_opt_state=_replace_at(state.outer_opt_state, p, opt_p))
    else:
      local_p = self._receive_late[d, p](local_p, f.select(state.outer_params, p),
                                         state.status[p])
    state = state.replace(local_params=f.merge_into(state.local_params, p, local_p))
    if d == self.tau_first and self.quarantine:   # non-finite workers restart from θ_g
      state = self._restart_workers(state, state.status[p][0], True)
    return state

  def _blocking_sync(self, program, state: DilocoState, p: int,
                     t: int) -> tuple[DilocoState, dict]:
    """Runs one of `_blocking_syncs`' programs for fragment p's sync at step t on the state,
    then restarts the workers it quarantined."""
    f = self.fragments
    g, local_p, opt_p, residual_p, rng, status, m = program(
        f.select(state.outer_params, p), f.select(state.local_params, p),
        state.outer_opt_state[p], self._residual(state, p), state.rng, self._mask(t, p))
    state = state.replace(outer_params=f.merge_into(state.outer_params, p, g),
                          local_params=f.merge_into(state.local_params, p, local_p),
                          outer_opt_state=_replace_at(state.outer_opt_state, p, opt_p), rng=rng,
                          status=_replace_at(state.status, p, status))
    if self.quarantine:
      state = self._restart_workers(state, status[0], True)
    return self._keep_residual(state, p, residual_p), m

  def programs(self, state: DilocoState, batch_MxB,
               final_step: int = 0) -> list[tuple[str, Any, tuple]]:
    """(name, jitted program, its arguments) for every program `step` dispatches in an outer
    round (and, with `final_step` = T > 0, those `final_sync(state, T)` adds), with the
    arguments `step` gives them (arrays or abstract ShapeDtypeStructs): for ahead-of-time
    compilation and memory checks (train.py, aot.py, experiments/bench.py)."""
    f = self.fragments
    out = [("inner_step", self._inner_step,
            (state.step, state.local_params, state.inner_opt_state, batch_MxB))]
    if self.delay == "none" and (self.quarantine or self.faults is not None):
      restart = (state.local_params, state.inner_opt_state, state.outer_params,
                 state.status[0][0])
      out.extend((f"restart{', fresh inner state' if r else ''}", self._restart[r], restart)
                 for r in (True, False)
                 if r or self.faults is not None and not self.faults.reset_inner_opt)
    for p in range(f.num_fragments):
      outer_p, local_p = f.select(state.outer_params, p), f.select(state.local_params, p)
      blocking = (outer_p, local_p, state.outer_opt_state[p], self._residual(state, p), state.rng,
                  self._everyone)
      if self.delay != "none":
        args = self._delayed_args(state, p)
        for first in ((True, False) if self.delay == "naive" else (False,)):
          out.append((f"sync[{p}]{', round 1' if first else ''}",
                      self._delayed_program(p, first), args))
        if final_step:
          last = self.schedule.last_send(p, final_step)
          out.append((f"final_sync[{p}]", self._delayed_final_program(
              p, last is not None, last != final_step), args))
        continue
      if self.tau_first == 0:
        out.append((f"sync[{p}]", self._sync[p], blocking))
      else:
        out.append((f"send[{p}]", self._send[p], (outer_p, local_p, self._residual(state, p),
                                                  state.rng, self._everyone)))
        out.append((f"receive[{p}]", self._receive_first[p],
                    (outer_p, local_p, state.outer_opt_state[p], state.inflight[p],
                     state.status[p])))
      out.extend((f"receive[{p}, τ={d}]", self._receive_late[d, p],
                  (local_p, outer_p, state.status[p]))
                 for d in sorted(set(self.taus)) if d not in (0, self.tau_first))
      if final_step and p in self._flushed(final_step):
        out.append((f"final_sync[{p}]", self._flush[p], blocking))
    return out

  def bits_sent(self, t: int):
    """Bits one worker transmits at step t (ring all-reduce convention, docs/design.md), summed
    over the worker's devices, each of which sends its own shards; with `faults`, the mean
    over workers (see `_sync_bits`: a float where it is not whole)."""
    return sum(self._sync_bits(t, p) for p in self.schedule.sends(t))

  @functools.cached_property
  def _outer_mean(self):
    """Eager updates: θ_g as the mean of the workers' outer copies (one program)."""
    return jax.jit(lambda t: jax.tree.map(lambda x: jnp.mean(x, axis=0), t),
                   out_shardings=sharding.named(self.mesh, self.specs))

  @functools.cached_property
  def _to_device_copy(self):
    """Offloaded outer params copied into device memory, in their layout (one program)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                   out_shardings=sharding.named(self.mesh, self.specs))

  def eval_params(self, state: DilocoState, which: str = "outer") -> PyTree:
    """The parameters to evaluate: the outer copy θ_g (the paper's choice), the worker mean, or
    worker 0. Fresh arrays: the next step donates the state's buffers."""
    if which == "outer" and self.delay == "eager":   # the workers' own copies, averaged
      return self._outer_mean(state.outer_params)
    if which == "outer":
      leaves = jax.tree.leaves(state.outer_params)
      if any(getattr(x.sharding, "memory_kind", None) == "pinned_host" for x in leaves):
        return self._to_device_copy(state.outer_params)   # offloaded
      return _copy_tree(state.outer_params)
    if which == "worker_mean":
      return jax.tree.map(lambda x: jnp.mean(x, axis=0), state.local_params)
    if which == "worker0":
      return jax.tree.map(lambda x: x[0], state.local_params)
    raise ValueError(f"eval.params must be 'outer', 'worker_mean' or 'worker0', got {which!r}")


@jax.jit
def _copy_tree(tree):
  """One program that copies a whole tree (a jit without donation returns new buffers)."""
  return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where every state field lives: NamedShardings from the params' specs (see DilocoState).

  The device-memory shardings are what programs compute on; `home_*` are where the fields rest
  between programs (pinned_host for the outer fields with `offload_outer`).
  """

  algo: Any
  repl: Any
  worker_vector: Any
  local: PyTree
  inner_opt: PyTree
  shared: PyTree      # a params-shaped leaf without the worker dim (the in-flight means)
  outer: PyTree       # the outer copy: `shared`, or per worker with eager updates
  outer_opt: tuple
  residual: tuple

  @classmethod
  def build(cls, algo: "StreamingDiLoCo", params: PyTree) -> "_Layout":
    mesh, specs, f = algo.mesh, algo.specs, algo.fragments
    worker = lambda tree: jax.tree.map(sharding.per_worker, tree, is_leaf=sharding.is_spec)
    inner_specs = sharding.opt_state_specs(algo.inner_opt, params, specs)
    own = worker if algo.delay == "eager" else (lambda tree: tree)   # eager: outer per worker
    outer_opt = tuple(
        sharding.named(mesh, own(sharding.opt_state_specs(
            algo.outer_opt, f.select(params, p), f.select(specs, p))))
        for p in range(f.num_fragments))
    leaf_specs = jax.tree.leaves(specs, is_leaf=sharding.is_spec)
    return cls(
        algo=algo, repl=NamedSharding(mesh, P()),
        worker_vector=NamedSharding(mesh, P(mesh_lib.WORKER)),
        local=sharding.named(mesh, worker(specs)),
        inner_opt=sharding.named(mesh, worker(inner_specs)),
        shared=sharding.named(mesh, specs), outer=sharding.named(mesh, own(specs)),
        outer_opt=outer_opt,
        residual=tuple(NamedSharding(mesh, sharding.per_worker(s)) for s in leaf_specs))

  def _host(self, tree):
    if not self.algo.offload_outer:
      return tree
    return jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), tree)

  def frag(self, field: str, p: int) -> list:
    """Device shardings of fragment p's leaves of a field: local, outer, inflight, residual,
    sent (eager updates: per worker, like local)."""
    f = self.algo.fragments
    if field == "residual":
      return [self.residual[i] for i in f.leaf_indices(p)]
    return f.select({"local": self.local, "sent": self.local, "outer": self.outer,
                     "inflight": self.shared}[field], p)

  def home_frag(self, field: str, p: int) -> list:
    out = self.frag(field, p)
    return self._host(out) if field in ("outer", "inflight") else out

  def home_outer_opt(self, p: int):
    return self._host(self.outer_opt[p])

  def to_device(self, tree, shardings):
    """Inside a program: the offloaded inputs brought into device memory (no-op otherwise)."""
    if not self.algo.offload_outer:
      return tree
    return jax.tree.map(jax.device_put, tree, shardings)

  def home_state(self) -> "DilocoState":
    algo, f = self.algo, self.algo.fragments
    P_ = f.num_fragments
    return DilocoState(
        step=self.repl, local_params=self.local, inner_opt_state=self.inner_opt,
        outer_params=self._host(self.outer),
        outer_opt_state=tuple(self.home_outer_opt(p) for p in range(P_)),
        inflight=tuple(self.home_frag("inflight", p) for p in range(P_))
        if algo._has_inflight else (),
        residual=self.residual if algo.error_feedback else (),
        sent=tuple(self.frag("sent", p) for p in range(P_)) if algo.delay == "eager" else (),
        status=tuple((self.worker_vector, self.repl) for _ in range(P_))
        if algo.delay == "none" else (),
        rng=self.repl)


class DispatchBound:
  """Keeps at most k steps in flight: before dispatching step t, waits until the inner step of
  t − k has finished (never for the step just dispatched, so the device always has k steps of
  work queued and a send still overlaps the next inner step).

  Why: with an unbounded queue, XLA:CPU's simulated devices deadlocked in a collective
  rendezvous ("only 3 of 4 arrived"): 6 runs out of 6 of Streaming DiLoCo (M=4, τ=2, 300 steps
  dispatched without a host sync), none in 11 runs with k = 2 or 4. Cost: the quick start took
  48.5 and 49.4 s with k = 2, 47.7 and 47.5 s with k = 4, 45.6 and 46.9 s unbounded (it then
  syncs only at logged steps). k = 0 disables it.
  """

  def __init__(self, k: int):
    self.k = checks.integer("max_steps_in_flight", k, 0)
    self._markers = collections.deque()

  def reset(self) -> None:
    self._markers.clear()

  def wait(self) -> None:
    while self.k and len(self._markers) >= self.k:
      self._markers.popleft().block_until_ready()

  def push(self, marker: jax.Array) -> None:
    if self.k:
      self._markers.append(marker)


def _replace_at(items: tuple, i: int, value) -> tuple:
  return tuple(value if j == i else x for j, x in enumerate(items))


def _scatter(items: tuple, indices, values) -> tuple:
  out = list(items)
  for i, v in zip(indices, values):
    out[i] = v
  return tuple(out)


def over_workers(one_worker: Callable, mesh: Mesh, M: int) -> Callable:
  """`one_worker` (inputs and outputs for ONE worker) lifted to [M, ...] inputs and outputs whose
  leading axis is split over the mesh's worker axis.

  A worker that spans several devices (a data, context or model axis above 1): `vmap` with
  `spmd_axis_name`, the partitioner splitting each worker's computation. A worker on one device
  (the simulated workers on CPU): a `shard_map` whose body is one device's own workers' step,
  unbatched when the device holds one worker. The two compute the same thing; the second is
  what makes the model's layout-aware matmuls count there (docs/cpu_speed.md): under `vmap`
  every dot keeps a worker dimension, of size 1 per device after partitioning, and a batched
  dot on XLA:CPU copies every operand that is not in [M, K] × [K, N] form."""
  if mesh_lib.devices_per_worker(mesh) > 1:
    return jax.vmap(one_worker, spmd_axis_name=mesh_lib.WORKER)
  per_device = M // mesh_lib.axis_size(mesh, mesh_lib.WORKER)

  def body(*args):
    if per_device > 1:
      # One worker after another (a loop: one copy of the step in the program), each
      # unbatched. Measured against vmap (batched dots) and an unrolled loop, M = 4 on 2
      # devices: 70-72 against 77-87 ms of CPU per worker-step (docs/cpu_speed.md).
      return jax.lax.map(lambda a: one_worker(*a), args)
    out = one_worker(*jax.tree.map(lambda x: x[0], args))
    return jax.tree.map(lambda x: x[None], out)

  return jax.shard_map(body, mesh=mesh, in_specs=P(mesh_lib.WORKER),
                       out_specs=P(mesh_lib.WORKER))


def worker_grads(loss_fn: LossFn, mesh: Mesh, M: int) -> Callable:
  """Each worker's ((loss, aux), gradient) on its own batch, lifted by `over_workers`:
  (params, batch) [M, ...] → ((loss [M], aux [M, ...]), grads [M, ...])."""
  return over_workers(lambda p, b: jax.value_and_grad(loss_fn, has_aux=True)(p, b), mesh, M)


def worker_steps(loss_fn: LossFn, opt, mesh: Mesh, M: int) -> Callable:
  """`inner.worker_step` for all M workers: (local, opt_state, batch) [M, ...] → (local,
  opt_state, loss [M], aux [M, ...]).

  The gradients inside the lift (`over_workers`: on CPU a shard_map whose body is one worker's
  unbatched forward and backward), the optimizer outside it, over the [M, ...] arrays, as
  data-parallel's is over its one model. With AdamW inside the shard_map the compiled step
  copied every donated parameter and moment buffer (110 copy ops against data-parallel's 44;
  docs/cpu_speed.md). Same maths as `worker_step`, not always the same bits (XLA fuses the
  update differently), so the bit-exact references lift their steps with this too."""
  grads = worker_grads(loss_fn, mesh, M)
  update = jax.vmap(lambda g, s, p: inner.apply_update(opt, g, s, p),
                    spmd_axis_name=mesh_lib.WORKER)

  def steps(local, opt_state, batch_MxB):
    (loss_M, aux_M), grads_M = grads(local, batch_MxB)
    local, opt_state = update(grads_M, opt_state, local)
    return local, opt_state, loss_M, aux_M

  return steps


def DiLoCo(loss_fn: LossFn, inner_opt, outer_opt, *, num_workers: int, inner_steps: int,
           mesh: Mesh | None = None, codec: Codec | str = "fp32", wire: str = "reference",
           error_feedback: bool = False, **layout) -> StreamingDiLoCo:
  """DiLoCo (Algorithm 1): one fragment, no overlap, workers restart from the outer copy
  (optionally with a quantized all-reduce). `layout`: StreamingDiLoCo's `param_specs`,
  `offload_outer`, `max_steps_in_flight`, `delay` (the one-round overlap: "naive" or
  "eager"), and `fragments` + `sync_every` for a part synced on its own period (the MoE
  routers)."""
  return StreamingDiLoCo(loss_fn, inner_opt, outer_opt, num_workers=num_workers,
                         inner_steps=inner_steps, mesh=mesh, codec=codec, wire=wire,
                         error_feedback=error_feedback, **layout)


class DPState(struct.PyTreeNode):
  """Data-parallel state: step int32 []; params and opt_state replicated (no worker dim)."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree


class DataParallel:
  """The baseline: every step, each worker's gradient on its own batch, averaged over workers
  (the all-reduce), then one optimizer step on the single shared model. With `param_specs` the
  model and its optimizer state are sharded inside a worker by the same rules as DiLoCo's
  (FSDP over the data axis, tensor parallelism over the model axis) and replicated over
  workers."""

  def __init__(self, loss_fn: LossFn, opt: optax.GradientTransformation, *, num_workers: int,
               mesh: Mesh | None = None, grad_dtype=jnp.float32, max_steps_in_flight: int = 2,
               param_specs=None):
    num_workers = checks.integer("num_workers (M)", num_workers, 1)
    self.loss_fn = loss_fn
    self.opt = opt
    self.M = num_workers
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(num_workers)
    self.grad_bits = jnp.dtype(grad_dtype).itemsize * 8
    self.numel = 0
    self._specs_arg = param_specs
    self._bound = DispatchBound(max_steps_in_flight)

  def bind(self, params: PyTree) -> None:
    """Fixes the state's layout from the params' structure (`params` may be abstract)."""
    self._bound.reset()
    self.__dict__.pop("_step", None)
    self.numel = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    specs = self._specs_arg(params) if callable(self._specs_arg) else self._specs_arg
    self.specs = sharding.param_specs(self.mesh, params, None) if specs is None else specs
    self.shardings = DPState(
        step=NamedSharding(self.mesh, P()), params=sharding.named(self.mesh, self.specs),
        opt_state=sharding.named(self.mesh, sharding.opt_state_specs(self.opt, params,
                                                                      self.specs)))

  def init(self, params: PyTree, rng: jax.Array | None = None) -> DPState:
    del rng
    self.bind(params)
    # Built under jit so the state owns fresh buffers: the step donates them, and the caller's
    # params must survive that.
    build = lambda p: DPState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.opt.init(p))
    return jax.jit(build, out_shardings=self.shardings)(params)

  def state_shardings(self) -> DPState:
    return self.shardings

  @functools.cached_property
  def _step(self):
    grads_per_worker = worker_grads(self.loss_fn, self.mesh, self.M)

    def step(state: DPState, batch_MxB):
      # The params enter the lift broadcast to [M, ...] (split over the worker axis, so each
      # worker's devices hold one copy, as replicated params would): some batching rules need
      # every operand batched (jax.lax.ragged_dot, the dropless MoE's grouped matmul).
      params_M = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.M,) + x.shape), state.params)
      (loss_M, aux_M), grads_M = grads_per_worker(params_M, batch_MxB)
      grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads_M)  # the all-reduce
      updates, opt_state = self.opt.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      return (DPState(step=state.step + 1, params=params, opt_state=opt_state),
              {"loss": loss_M, "aux": aux_M})

    per_worker = NamedSharding(self.mesh, P(mesh_lib.WORKER))
    return jax.jit(step, donate_argnums=0, out_shardings=(
        self.shardings, {"loss": per_worker, "aux": per_worker}))

  def step(self, state: DPState, batch_MxB: jax.Array, t: int):
    del t
    self._bound.wait()
    state, metrics = self._step(state, batch_MxB)
    self._bound.push(metrics["loss"])
    return state, metrics

  def programs(self, state: DPState, batch_MxB,
               final_step: int = 0) -> list[tuple[str, Any, tuple]]:
    """The one program `step` dispatches, with its arguments (see StreamingDiLoCo.programs)."""
    del final_step   # nothing to flush: the one model is up to date after every step
    return [("step", self._step, (state, batch_MxB))]

  def final_sync(self, state: DPState, t: int) -> tuple[DPState, dict]:
    del t
    return state, {}

  def final_bits(self, t: int) -> int:
    del t
    return 0

  def bits_sent(self, t: int) -> int:
    del t
    return collectives.ring_allreduce_bits(self.numel, self.grad_bits, self.M)

  def eval_params(self, state: DPState, which: str = "outer") -> PyTree:
    """The one model (fresh arrays: the next step donates the state's). Data-parallel training
    has no worker copies, so `which` must be "outer"."""
    if which != "outer":
      raise ValueError(f"eval.params must be 'outer' for data-parallel training, got {which!r}")
    return _copy_tree(state.params)
