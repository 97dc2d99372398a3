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

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from diloco_jax import collectives, fragments as fragments_lib, inner, mesh as mesh_lib, outer
from diloco_jax.quantize import Codec, get_codec

PyTree = Any
LossFn = Callable[[PyTree, jax.Array], tuple[jax.Array, dict]]


class DilocoState(struct.PyTreeNode):
  """Everything a (Streaming) DiLoCo run needs to continue, bit for bit.

  Fields (M workers, P fragments; "[M, ...]" leaves are sharded P(WORKER, ...)):
    step:            int32 [] — inner steps completed (t of the last step).
    local_params:    params pytree, leaves [M, ...] — θ_m, each worker's own parameters.
    inner_opt_state: optax state, leaves [M, ...] — each worker's AdamW state (never communicated).
    outer_params:    params pytree, no worker dim — θ_g, the pure outer copy (before any α-mixing).
    outer_opt_state: tuple of P optax states, fragment p's over the list of its leaves.
    inflight:        tuple of P lists of fp32 leaves (no worker dim) — the all-reduced Δ_p sent and
                     not yet merged; empty tuple when τ=0 (send and receive are one program).
    residual:        list of fp32 leaves [M, ...] — error-feedback quantization residuals, or ().
    rng:             PRNG key for stochastic rounding.
  """

  step: jax.Array
  local_params: PyTree
  inner_opt_state: PyTree
  outer_params: PyTree
  outer_opt_state: tuple
  inflight: tuple
  residual: tuple
  rng: jax.Array


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
    overlap_steps: τ, inner steps between a fragment's send and its merge (0 ≤ τ < H).
    merge_alpha: α, the weight of the local parameters in the merge (0: take the outer copy).
    codec: a `quantize.Codec` (or its name) for the outer gradients on the wire; default fp32.
    wire: "reference" (quantize → dequantize → fp32 mean) or "packed" (the packed low-bit
      payload crosses the worker axis; see collectives.py).
    error_feedback: keep each worker's quantization residual and add it to its next Δ.
  """

  def __init__(self, loss_fn: LossFn, inner_opt: optax.GradientTransformation,
               outer_opt: optax.GradientTransformation, *, num_workers: int, inner_steps: int,
               mesh: Mesh | None = None, fragments=None, overlap_steps: int = 0,
               merge_alpha: float = 0.0, codec: Codec | str = "fp32", wire: str = "reference",
               error_feedback: bool = False):
    if num_workers < 1:
      raise ValueError(f"diloco.num_workers (M) must be at least 1, got {num_workers}")
    if inner_steps < 1:
      raise ValueError(f"diloco.inner_steps (H) must be at least 1, got {inner_steps}")
    if not 0.0 <= merge_alpha <= 1.0:
      raise ValueError(f"diloco.merge_alpha (α) must be in [0, 1], got {merge_alpha}")
    if wire not in collectives.WIRES:
      raise ValueError(f"diloco.wire must be one of {collectives.WIRES}, got {wire!r}")
    self.loss_fn = loss_fn
    self.inner_opt = inner_opt
    self.outer_opt = outer_opt
    self.M = num_workers
    self.H = inner_steps
    self.tau = overlap_steps
    self.alpha = float(merge_alpha)
    self.codec = get_codec(codec) if isinstance(codec, str) else codec
    self.wire = wire
    self.error_feedback = error_feedback
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(num_workers)
    self._fragments_arg = fragments
    self.fragments: fragments_lib.Fragments | None = None
    self.schedule: fragments_lib.Schedule | None = None

  # ----------------------------------------------------------------------------------- set-up
  def _bind(self, params: PyTree) -> None:
    """Fixes the fragments and the schedule from the params' structure (static Python)."""
    f = self._fragments_arg
    if f is None:
      f = fragments_lib.single(params)
    elif callable(f) and not isinstance(f, fragments_lib.Fragments):
      f = f(params)
    self.fragments = f
    self.fragment_numel = f.sizes(params)
    self.schedule = fragments_lib.Schedule(H=self.H, P=f.num_fragments, tau=self.tau)

  def init(self, params: PyTree, rng: jax.Array | None = None) -> DilocoState:
    """Every worker starts from the same `params`; θ_g = params; outer states per fragment."""
    self._bind(params)
    rng = jax.random.key(0) if rng is None else rng
    f = self.fragments

    def build(params, rng):
      stack = lambda x: jnp.broadcast_to(x[None], (self.M,) + x.shape)
      local = jax.tree.map(stack, params)
      inner_state = jax.vmap(self.inner_opt.init)(local)
      outer_states = tuple(self.outer_opt.init(f.select(params, p)) for p in range(f.num_fragments))
      inflight = () if self.tau == 0 else tuple(
          [jnp.zeros(x.shape, jnp.float32) for x in f.select(params, p)]
          for p in range(f.num_fragments))
      residual = tuple(jnp.zeros((self.M,) + x.shape, jnp.float32)
                       for x in jax.tree.leaves(params)) if self.error_feedback else ()
      state = DilocoState(step=jnp.zeros((), jnp.int32), local_params=local,
                          inner_opt_state=inner_state, outer_params=params,
                          outer_opt_state=outer_states, inflight=inflight, residual=residual,
                          rng=rng)
      return self._constrain(state)

    return jax.jit(build)(params, rng)

  def _constrain(self, state: DilocoState) -> DilocoState:
    """Pins every field's sharding: per-worker fields over WORKER, the rest replicated. Applied
    to every program's output so that the state's layout never changes (no recompiles)."""
    per_worker = lambda t: jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(
            x, mesh_lib.worker_sharding(self.mesh, x.ndim - 1)), t)
    repl = lambda t: jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, mesh_lib.replicated(self.mesh)), t)
    return state.replace(
        step=repl(state.step), local_params=per_worker(state.local_params),
        inner_opt_state=per_worker(state.inner_opt_state),  # vmapped: every leaf has [M]
        outer_params=repl(state.outer_params), outer_opt_state=repl(state.outer_opt_state),
        inflight=repl(state.inflight), residual=per_worker(state.residual), rng=repl(state.rng))

  def state_shardings(self, state: DilocoState) -> DilocoState:
    """The NamedSharding of every state field (for checkpoint restore and tests)."""
    return jax.tree.map(lambda x: x.sharding, state)

  # ----------------------------------------------------------------------------- the programs
  @functools.cached_property
  def _inner_step(self):
    def one_worker(params, opt_state, batch):
      params, opt_state, loss, _ = inner.worker_step(self.loss_fn, self.inner_opt, params,
                                                     opt_state, batch)
      return params, opt_state, loss

    all_workers = jax.vmap(one_worker, spmd_axis_name=mesh_lib.WORKER)

    def step(state: DilocoState, batch_MxB):
      local, opt_state, loss_M = all_workers(state.local_params, state.inner_opt_state, batch_MxB)
      state = state.replace(step=state.step + 1, local_params=local, inner_opt_state=opt_state)
      return self._constrain(state), {"loss": loss_M}

    return jax.jit(step, donate_argnums=0)

  def _reduce(self, state: DilocoState, p: int):
    """The send half: Δ_p = mean_m Q(θ_{g,p} − θ_{m,p} [+ residual]) in fp32, and diagnostics."""
    f = self.fragments
    delta = outer.outer_gradient(f.select(state.outer_params, p), f.select(state.local_params, p))
    idx = f.leaf_indices(p)
    rng, sub = jax.random.split(state.rng)
    residual = state.residual
    if self.error_feedback:
      delta = [d + residual[i] for d, i in zip(delta, idx)]
    mean, sent = collectives.worker_mean(delta, self.codec, self.mesh, wire=self.wire,
                                         rng=sub if self.codec.stochastic else None)
    metrics = {f"outer_grad_norm/{p}": inner.global_norm(mean)}
    if self.codec.name != "fp32" or self.error_feedback:
      metrics[f"quant_rel_error/{p}"] = collectives.relative_error(delta, sent)
    if self.error_feedback:
      residual = list(residual)
      for i, d, s in zip(idx, delta, sent):
        residual[i] = d - s
      residual = tuple(residual)
    if self.M > 1:
      cos = outer.cosine_similarity_matrix(delta)
      off = (jnp.sum(cos) - jnp.trace(cos)) / (self.M * (self.M - 1))
      metrics[f"outer_grad_cosine/{p}"] = off
    return mean, state.replace(rng=rng, residual=residual), metrics

  def _apply(self, state: DilocoState, p: int, mean: list) -> DilocoState:
    """The receive half: θ_{g,p} ← OuterOpt_p(θ_{g,p}, Δ_p); θ_{m,p} ← α·θ_{m,p} + (1−α)·θ_{g,p}."""
    f = self.fragments
    g, opt_p = outer.outer_update(self.outer_opt, f.select(state.outer_params, p),
                                  state.outer_opt_state[p], mean)
    local = outer.merge(f.select(state.local_params, p), g, self.alpha)
    opt_states = tuple(opt_p if q == p else s for q, s in enumerate(state.outer_opt_state))
    return state.replace(outer_params=f.merge_into(state.outer_params, p, g),
                         local_params=f.merge_into(state.local_params, p, local),
                         outer_opt_state=opt_states)

  @functools.cached_property
  def _sync(self):
    """τ = 0: send and receive of fragment p as one program (per p, compiled once each)."""
    def sync(p, state):
      mean, state, metrics = self._reduce(state, p)
      return self._constrain(self._apply(state, p, mean)), metrics
    return [jax.jit(functools.partial(sync, p), donate_argnums=0)
            for p in range(self.fragments.num_fragments)]

  @functools.cached_property
  def _send(self):
    def send(p, state):
      mean, state, metrics = self._reduce(state, p)
      inflight = tuple(mean if q == p else x for q, x in enumerate(state.inflight))
      return self._constrain(state.replace(inflight=inflight)), metrics
    return [jax.jit(functools.partial(send, p), donate_argnums=0)
            for p in range(self.fragments.num_fragments)]

  @functools.cached_property
  def _receive(self):
    def receive(p, state):
      return self._constrain(self._apply(state, p, state.inflight[p]))
    return [jax.jit(functools.partial(receive, p), donate_argnums=0)
            for p in range(self.fragments.num_fragments)]

  # ------------------------------------------------------------------------------- host loop
  def step(self, state: DilocoState, batch_MxB: jax.Array, t: int):
    """Inner step t (1-based) for all workers, then the syncs the static schedule puts at t.

    Returns (state, metrics); metrics are device values (fetch them late to avoid a host sync).
    """
    if self.schedule is None:
      raise RuntimeError("call init(params) before step()")
    state, metrics = self._inner_step(state, batch_MxB)
    if self.tau == 0:
      for p in self.schedule.sends(t):
        state, m = self._sync[p](state)
        metrics.update(m)
      return state, metrics
    # Receives first: a fragment sent at t − τ merges after step t; then this step's sends.
    # (τ ≥ 1, so a fragment never sends and receives at the same t.)
    for p in self.schedule.receives(t):
      state = self._receive[p](state)
    for p in self.schedule.sends(t):
      state, m = self._send[p](state)
      metrics.update(m)
    return state, metrics

  def bits_sent(self, t: int) -> int:
    """Bits one worker transmits at step t (ring all-reduce convention, docs/design.md)."""
    total = 0
    for p in self.schedule.sends(t):
      total += collectives.bits_per_worker(self.fragment_numel[p], self.codec, self.M, self.wire)
    return total

  def eval_params(self, state: DilocoState, which: str = "outer") -> PyTree:
    """The parameters to evaluate: the outer copy θ_g (the paper's choice), the worker mean, or
    worker 0."""
    if which == "outer":
      return state.outer_params
    if which == "worker_mean":
      return jax.tree.map(lambda x: jnp.mean(x, axis=0), state.local_params)
    if which == "worker0":
      return jax.tree.map(lambda x: x[0], state.local_params)
    raise ValueError(f"eval.params must be 'outer', 'worker_mean' or 'worker0', got {which!r}")


def DiLoCo(loss_fn: LossFn, inner_opt, outer_opt, *, num_workers: int, inner_steps: int,
           mesh: Mesh | None = None) -> StreamingDiLoCo:
  """DiLoCo (Algorithm 1): one fragment, no overlap, workers restart from the outer copy."""
  return StreamingDiLoCo(loss_fn, inner_opt, outer_opt, num_workers=num_workers,
                         inner_steps=inner_steps, mesh=mesh)


class DPState(struct.PyTreeNode):
  """Data-parallel state: step int32 []; params and opt_state replicated (no worker dim)."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree


class DataParallel:
  """The baseline: every step, each worker's gradient on its own batch, averaged over workers
  (the all-reduce), then one optimizer step on the single shared model."""

  def __init__(self, loss_fn: LossFn, opt: optax.GradientTransformation, *, num_workers: int,
               mesh: Mesh | None = None, grad_dtype=jnp.float32):
    if num_workers < 1:
      raise ValueError(f"diloco.num_workers (M) must be at least 1, got {num_workers}")
    self.loss_fn = loss_fn
    self.opt = opt
    self.M = num_workers
    self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(num_workers)
    self.grad_bits = jnp.dtype(grad_dtype).itemsize * 8
    self.numel = 0

  def init(self, params: PyTree, rng: jax.Array | None = None) -> DPState:
    del rng
    self.numel = sum(x.size for x in jax.tree.leaves(params))
    # Built under jit so the state owns fresh buffers: the step donates them, and the caller's
    # params must survive that.
    build = lambda p: DPState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.opt.init(p))
    return jax.jit(build, out_shardings=mesh_lib.replicated(self.mesh))(params)

  @functools.cached_property
  def _step(self):
    grads_per_worker = jax.vmap(
        lambda p, b: jax.value_and_grad(self.loss_fn, has_aux=True)(p, b),
        in_axes=(None, 0), spmd_axis_name=mesh_lib.WORKER)

    def step(state: DPState, batch_MxB):
      (loss_M, _), grads_M = grads_per_worker(state.params, batch_MxB)
      grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads_M)  # the all-reduce
      updates, opt_state = self.opt.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      out = DPState(step=state.step + 1, params=params, opt_state=opt_state)
      out = jax.tree.map(
          lambda x: jax.lax.with_sharding_constraint(x, mesh_lib.replicated(self.mesh)), out)
      return out, {"loss": loss_M}

    return jax.jit(step, donate_argnums=0)

  def step(self, state: DPState, batch_MxB: jax.Array, t: int):
    del t
    return self._step(state, batch_MxB)

  def bits_sent(self, t: int) -> int:
    del t
    return collectives.ring_allreduce_bits(self.numel, self.grad_bits, self.M)

  def eval_params(self, state: DPState, which: str = "outer") -> PyTree:
    del which
    return state.params
