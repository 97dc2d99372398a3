"""The host loop: config -> data, model, algorithm; dispatch, eval, checkpoints, metrics.

The only module that reads a ConfigDict. `validate` turns it into a frozen `RunConfig` and fails
with one sentence naming the key before anything is compiled; `run` then trains. In the steady
state the loop never waits on a device value: metrics are fetched one logged step late.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diloco_jax import (algorithm, checkpoint, collectives, data, distributed, fragments, inner,
                        outer)
from diloco_jax import mesh as mesh_lib
from diloco_jax import metrics as metrics_lib
from diloco_jax import model as model_lib
from diloco_jax import quantize

ALGORITHMS = ("dp", "diloco", "streaming")
SOURCES = ("synthetic", "text")
EVAL_PARAMS = ("outer", "worker_mean", "worker0")


class ConfigError(ValueError):
  """A bad config value; the message is one sentence naming the key and what is allowed."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The validated, typed view of a config file (see experiments/configs/diloco.py for units)."""

  algorithm: str
  seed: int
  model: model_lib.ModelConfig
  M: int                      # diloco.num_workers
  H: int                      # diloco.inner_steps
  outer_optimizer: str
  outer_lr: float
  outer_momentum: float
  P_layers: int               # diloco.layers_per_fragment (streaming)
  fragment_pattern: str       # diloco.fragment_pattern (streaming)
  tau: int | tuple[int, ...]  # diloco.overlap_steps, or diloco.worker_overlap_steps (streaming)
  alpha: float                # diloco.merge_alpha (streaming)
  codec: quantize.Codec       # diloco.codec (streaming)
  wire: str                   # diloco.wire (streaming)
  error_feedback: bool        # diloco.error_feedback (streaming)
  num_steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  final_lr_fraction: float
  weight_decay: float | None
  b1: float
  b2: float
  grad_clip: float | None
  log_every: int
  source: str
  paths: tuple[str, ...]
  seq_len: int
  data_vocab: int
  data_classes: int
  eval_every: int
  eval_batches: int
  eval_batch_size: int
  eval_params: str
  ckpt_every: int
  ckpt_keep: int
  mesh_data: int
  mesh_model: int
  num_cpu_devices: int


def _require(ok: bool, msg: str) -> None:
  if not ok:
    raise ConfigError(msg)


def _get(c: ml_collections.ConfigDict, path: str, default: Any = None) -> Any:
  node = c
  for part in path.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def expand_paths(paths) -> tuple[str, ...]:
  """Files named by a string or list of paths/globs; a missing file is a ConfigError."""
  if isinstance(paths, str):
    paths = (paths,)
  out = []
  for p in paths:
    hits = sorted(glob.glob(os.path.expanduser(p)))
    _require(bool(hits), f"data.paths entry {p!r} matches no file")
    out += hits
  return tuple(out)


def validate(c: ml_collections.ConfigDict) -> RunConfig:
  """Checks every value and builds the RunConfig; raises ConfigError (one sentence)."""
  g = functools.partial(_get, c)
  alg = g("algorithm")
  _require(alg in ALGORITHMS, f"algorithm must be one of {ALGORITHMS}, got {alg!r}")
  for key in ("diloco.num_workers", "diloco.inner_steps", "train.num_steps", "train.batch_size",
              "data.seq_len", "train.log_every", "eval.num_batches", "eval.batch_size"):
    v = g(key)
    _require(isinstance(v, int) and v >= 1, f"{key} must be an integer >= 1, got {v!r}")
  for key in ("eval.every_steps", "checkpoint.every_steps", "train.warmup_steps"):
    v = g(key)
    _require(isinstance(v, int) and v >= 0, f"{key} must be an integer >= 0, got {v!r}")
  _require(g("train.learning_rate") > 0, "train.learning_rate must be > 0")
  seed = g("seed")
  _require(isinstance(seed, int) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
  for key in ("train.b1", "train.b2"):
    _require(0 <= g(key) < 1, f"{key} must be in [0, 1), got {g(key)!r}")
  _require(0 <= g("train.final_lr_fraction") <= 1,
           f"train.final_lr_fraction must be in [0, 1], got {g('train.final_lr_fraction')!r}")
  _require(g("diloco.outer_lr") > 0, "diloco.outer_lr must be > 0")
  _require(0 <= g("diloco.outer_momentum") < 1, "diloco.outer_momentum must be in [0, 1)")
  outer_opt = g("diloco.outer_optimizer", "nesterov")
  _require(outer_opt in outer.OUTER_OPTIMIZERS,
           f"diloco.outer_optimizer must be one of {outer.OUTER_OPTIMIZERS}, got {outer_opt!r}")
  mesh_data, mesh_model = g("mesh.data", 1), g("mesh.model", 1)
  _require(isinstance(mesh_data, int) and mesh_data >= 1, "mesh.data must be an integer >= 1")
  _require(mesh_model == 1, "mesh.model must be 1 (tensor parallelism is not implemented yet)")
  B = g("train.batch_size")
  _require(B % mesh_data == 0,
           f"train.batch_size={B} must be divisible by mesh.data={mesh_data} (devices per worker)")
  ev = g("eval.params", "outer")
  _require(ev in EVAL_PARAMS, f"eval.params must be one of {EVAL_PARAMS}, got {ev!r}")
  _require(alg != "dp" or ev == "outer", "eval.params must be 'outer' for algorithm='dp'")

  src = g("data.source")
  _require(src in SOURCES, f"data.source must be one of {SOURCES}, got {src!r}")
  paths: tuple[str, ...] = ()
  if src == "text":
    _require(bool(g("data.paths")), "data.paths must name at least one file for data.source='text'")
    paths = expand_paths(g("data.paths"))
  else:
    _require(g("data.vocab_size") >= 2, "data.vocab_size must be >= 2")
    _require(1 <= g("data.num_classes") <= g("data.vocab_size"),
             "data.num_classes must be between 1 and data.vocab_size")
  vocab = 256 if src == "text" else g("data.vocab_size")
  model_vocab = g("model.vocab_size", 0) or vocab
  _require(model_vocab >= vocab, f"model.vocab_size={model_vocab} is smaller than the data's "
           f"vocabulary ({vocab}); use 0 to take the data's")
  try:
    # Empty/None keys keep the preset's value (the paper presets use a GELU MLP).
    overrides = {k: g(f"model.{k}") for k in ("mlp", "tied_embeddings", "dtype")
                 if g(f"model.{k}") is not None and g(f"model.{k}") != ""}
    if g("model.num_layers", 0):
      overrides["num_layers"] = g("model.num_layers")
    model_cfg = model_lib.config_from_preset(g("model.preset"), vocab_size=model_vocab,
                                             **overrides)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None

  tau = g("diloco.overlap_steps", 0)
  worker_taus = tuple(g("diloco.worker_overlap_steps", ()) or ())
  if worker_taus:
    _require(alg == "streaming" and len(worker_taus) == g("diloco.num_workers"),
             f"diloco.worker_overlap_steps must list one τ per worker "
             f"(M={g('diloco.num_workers')}) for algorithm='streaming', got {worker_taus!r}")
    tau = worker_taus
  alpha = g("diloco.merge_alpha", 0.0)
  try:
    codec = quantize.get_codec(g("diloco.codec", "fp32"), g("diloco.codec_block_size", 32),
                               bool(g("diloco.stochastic_rounding", False)))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  wire = g("diloco.wire", "reference")
  _require(wire in collectives.WIRES, f"diloco.wire must be one of {collectives.WIRES}, got {wire!r}")
  pattern = g("diloco.fragment_pattern", "strided")
  if alg == "streaming":
    _require(pattern in fragments.PATTERNS,
             f"diloco.fragment_pattern must be one of {fragments.PATTERNS}, got {pattern!r}")
    for x in (tau if isinstance(tau, tuple) else (tau,)):
      _require(isinstance(x, int) and 0 <= x < g("diloco.inner_steps"),
               f"diloco.overlap_steps (τ) must be an integer with 0 <= τ < diloco.inner_steps "
               f"(H={g('diloco.inner_steps')}), got {x!r}")
    _require(0.0 <= alpha <= 1.0, f"diloco.merge_alpha (α) must be in [0, 1], got {alpha!r}")
  wd = g("train.weight_decay", -1.0)
  clip = g("train.grad_clip", 1.0)
  return RunConfig(
      algorithm=alg, seed=int(g("seed")), model=model_cfg, M=g("diloco.num_workers"),
      H=g("diloco.inner_steps"), outer_optimizer=outer_opt, outer_lr=float(g("diloco.outer_lr")),
      outer_momentum=float(g("diloco.outer_momentum")),
      P_layers=g("diloco.layers_per_fragment", 3), fragment_pattern=pattern, tau=tau,
      alpha=float(alpha), codec=codec, wire=wire,
      error_feedback=bool(g("diloco.error_feedback", False)), num_steps=g("train.num_steps"),
      batch_size=B, learning_rate=float(g("train.learning_rate")),
      warmup_steps=g("train.warmup_steps"), final_lr_fraction=float(g("train.final_lr_fraction")),
      weight_decay=None if wd < 0 else float(wd), b1=float(g("train.b1")), b2=float(g("train.b2")),
      grad_clip=float(clip) if clip and clip > 0 else None, log_every=g("train.log_every"),
      source=src, paths=paths, seq_len=g("data.seq_len"), data_vocab=vocab,
      data_classes=g("data.num_classes", 16), eval_every=g("eval.every_steps"),
      eval_batches=g("eval.num_batches"), eval_batch_size=g("eval.batch_size"), eval_params=ev,
      ckpt_every=g("checkpoint.every_steps"), ckpt_keep=g("checkpoint.max_to_keep", 2),
      mesh_data=mesh_data, mesh_model=mesh_model, num_cpu_devices=g("mesh.num_cpu_devices", 0))


def cpu_devices_for(c: ml_collections.ConfigDict) -> int:
  """How many simulated host devices the entry point asks for: one per worker and data shard."""
  n = _get(c, "mesh.num_cpu_devices", 0)
  if n:
    return n
  return max(1, _get(c, "diloco.num_workers", 1)) * max(1, _get(c, "mesh.data", 1)) \
      * max(1, _get(c, "mesh.model", 1))


# --------------------------------------------------------------------------------- building
def make_source(rc: RunConfig, split: str = "train"):
  if rc.source == "synthetic":
    return data.SyntheticLanguage(vocab_size=rc.data_vocab, num_classes=rc.data_classes,
                                  seed=rc.seed)
  try:
    return data.TextBytes(list(rc.paths), seq_len=rc.seq_len, split=split)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.paths: {e}") from None


def make_fragments(rc: RunConfig, params) -> fragments.Fragments:
  """The fragments and a schedule check; works on abstract params (jax.eval_shape), so a bad
  value stops the run before anything is compiled."""
  try:
    frags = fragments.by_blocks(params, layers_per_fragment=rc.P_layers,
                                pattern=rc.fragment_pattern)
    tau = max(rc.tau) if isinstance(rc.tau, tuple) else rc.tau
    fragments.Schedule(H=rc.H, P=frags.num_fragments, tau=tau)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return frags


def make_algorithm(rc: RunConfig, mesh, params):
  loss_fn = functools.partial(model_lib.loss_fn, rc.model)
  inner_opt = inner.inner_optimizer(
      rc.learning_rate, rc.num_steps, warmup_steps=rc.warmup_steps,
      final_lr_fraction=rc.final_lr_fraction, b1=rc.b1, b2=rc.b2, weight_decay=rc.weight_decay,
      grad_clip=rc.grad_clip)
  if rc.algorithm == "dp":
    return algorithm.DataParallel(loss_fn, inner_opt, num_workers=rc.M, mesh=mesh)
  outer_opt = outer.outer_optimizer(rc.outer_optimizer, rc.outer_lr, rc.outer_momentum)
  if rc.algorithm == "diloco":
    return algorithm.DiLoCo(loss_fn, inner_opt, outer_opt, num_workers=rc.M, inner_steps=rc.H,
                            mesh=mesh, codec=rc.codec, wire=rc.wire,
                            error_feedback=rc.error_feedback)
  frags = make_fragments(rc, params)
  return algorithm.StreamingDiLoCo(
      loss_fn, inner_opt, outer_opt, num_workers=rc.M, inner_steps=rc.H, mesh=mesh,
      fragments=frags, overlap_steps=rc.tau, merge_alpha=rc.alpha, codec=rc.codec, wire=rc.wire,
      error_feedback=rc.error_feedback)


def dp_bits_per_step(rc: RunConfig, numel: int) -> int:
  """What data-parallel training of the same model would send per step (fp32 ring all-reduce)."""
  return collectives.ring_allreduce_bits(numel, 32, rc.M)


@functools.lru_cache(maxsize=None)
def _eval_fn(model_cfg: model_lib.ModelConfig):
  def mean_loss(params, batches_NxBxL):
    losses = jax.lax.map(lambda b: model_lib.loss_fn(model_cfg, params, b)[1]["ce"], batches_NxBxL)
    return jnp.mean(losses)
  return jax.jit(mean_loss)


@functools.lru_cache(maxsize=None)
def _replicator(mesh):
  return jax.jit(lambda tree: tree, out_shardings=mesh_lib.replicated(mesh))


def _fetch(values: dict, mesh) -> dict:
  """Device metrics -> floats (the one place the loop reads device values). Per-worker values
  spread over processes are first gathered onto every device (one small program)."""
  if any(not v.is_fully_addressable for v in values.values() if isinstance(v, jax.Array)):
    values = _replicator(mesh)(values)
  out = {}
  for k, v in jax.device_get(values).items():
    out[k] = float(np.mean(v))   # per-worker values [M] -> their mean (also for M = 1)
  return out


# ------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None,
        log_all_processes: bool = False) -> dict:
  """Trains (or resumes) as the config says; returns the summary (also WORKDIR/summary.json).

  In a multi-process run (after `distributed.initialize`) every process calls this with the same
  arguments: each feeds its own workers, all write their checkpoint shards, and process 0 alone
  writes metrics, progress and the summary (every process prints progress with
  `log_all_processes`).

  `stop_after` ends the run after that step, as a preemption would (tests use it): checkpoints
  saved so far are kept, no summary is written, and running again resumes.
  """
  rc = validate(config)
  source = make_source(rc)
  eval_source = make_source(rc, "eval") if rc.source == "text" else source
  devices = jax.devices()
  if len(devices) < rc.mesh_data * rc.mesh_model:
    raise ConfigError(f"mesh.data * mesh.model = {rc.mesh_data * rc.mesh_model} exceeds the "
                      f"{len(devices)} available devices")
  key = jax.random.PRNGKey(rc.seed)
  init_key, algo_key = jax.random.split(key)
  if rc.algorithm == "streaming":   # validate fragments on shapes only, before compiling
    make_fragments(rc, jax.eval_shape(functools.partial(model_lib.init_params, rc.model),
                                      init_key))
  try:
    mesh = mesh_lib.make_mesh(rc.M, rc.mesh_data, rc.mesh_model)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  primary = distributed.is_primary()
  # Built under jit straight into the replicated layout, so every process holds its part of the
  # same global array (a process cannot device_put onto another's devices).
  params = jax.jit(functools.partial(model_lib.init_params, rc.model),
                   out_shardings=mesh_lib.replicated(mesh))(init_key)
  algo = make_algorithm(rc, mesh, params)
  state = algo.init(params, algo_key)
  numel = sum(x.size for x in jax.tree.leaves(params))
  del params

  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch_shape = (rc.M, rc.batch_size, rc.seq_len + 1)
  my_workers, my_rows = mesh_lib.process_batch_rows(mesh, batch_shape)
  train_it = data.make_batches(source, num_workers=rc.M, batch_size=rc.batch_size,
                               seq_len=rc.seq_len, seed=rc.seed, split="train",
                               workers=my_workers)
  eval_it = data.make_batches(eval_source, num_workers=1, batch_size=rc.eval_batch_size,
                              seq_len=rc.seq_len, seed=rc.seed, split="eval")
  eval_set = jax.make_array_from_process_local_data(
      mesh_lib.replicated(mesh), np.stack([next(eval_it)[0] for _ in range(rc.eval_batches)]))
  evaluate = _eval_fn(rc.model)
  floor = data.entropy_floor(source)

  os.makedirs(workdir, exist_ok=True)
  if primary:   # what the run was (evals rebuild the model from it)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=rc.ckpt_keep)
  start = ckpt.latest_step() or 0
  restored_sync = {}
  if start:
    state, host_state = ckpt.restore(start, state)
    train_it.set_state(host_state["data_iterator"])
    restored_sync = host_state["sync_diagnostics"]
    if primary:
      print(f"resumed from step {start} in {workdir}", flush=True)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start) if primary else None
  progress = metrics_lib.Progress(
      rc.num_steps, start, prefix=f"[process {jax.process_index()}] " if log_all_processes
      else "") if primary or log_all_processes else None
  tokens_per_step = rc.M * rc.batch_size * rc.seq_len
  # Bits are a deterministic function of the static schedule: recomputed, not checkpointed.
  bits = sum(algo.bits_sent(s) for s in range(1, start + 1))
  dp_step_bits = dp_bits_per_step(rc, numel)
  peak_bits = max((algo.bits_sent(s) for s in range(1, rc.num_steps + 1)), default=0)

  pending = None            # (step, device metrics, host values) logged one step late
  t_wall, t_log, last_log_step = time.perf_counter(), time.perf_counter(), start

  def flush(pending):
    nonlocal t_log, last_log_step
    step, dev, host = pending
    vals = _fetch(dev, mesh)
    now = time.perf_counter()
    tps = tokens_per_step * (step - last_log_step) / max(now - t_log, 1e-9)
    t_log, last_log_step = now, step
    row = {"train_loss": vals.pop("loss"), **({"eval_loss": vals.pop("eval_loss")}
                                               if "eval_loss" in vals else {}), **vals, **host,
           "tokens_per_s": tps}
    if writer is not None:
      writer.write(step, row)
    if progress is not None:
      progress.line(step, row["train_loss"], tps, row.get("eval_loss"))
    return {"step": step, **row}

  last_row, latest_sync = None, dict(restored_sync)
  for t in range(start + 1, rc.num_steps + 1):
    # This process's rows only; the global [M, B, L+1] array is assembled from every process's.
    batch = jax.make_array_from_process_local_data(
        batch_sharding, next(train_it)[:, my_rows], batch_shape)
    state, m = algo.step(state, batch, t)
    bits += algo.bits_sent(t)
    # Sync diagnostics come from the steps that send; keep the latest per fragment (still on
    # device) so that every logged row carries them.
    latest_sync.update((k, v) for k, v in m.items() if k != "loss")
    if pending is not None:   # the previous logged step's values are ready by now
      last_row = flush(pending)
      pending = None
    final = t == rc.num_steps
    if t % rc.log_every == 0 or final or (rc.eval_every and t % rc.eval_every == 0):
      if (rc.eval_every and t % rc.eval_every == 0) or final:
        m["eval_loss"] = evaluate(algo.eval_params(state, rc.eval_params), eval_set)
      m = {**latest_sync, **m}
      host = {"tokens_seen": t * tokens_per_step, "bits_sent_per_worker": bits,
              "bits_this_step": algo.bits_sent(t), "dp_bits_sent_per_worker": t * dp_step_bits}
      pending = (t, m, host)
    if (rc.ckpt_every and t % rc.ckpt_every == 0) or final:
      # The host-side state: the data position and the latest sync diagnostics (floats, read
      # here where orbax copies the state to the host anyway), so a resumed run logs the same.
      ckpt.save(t, state, {"data_iterator": train_it.get_state(),
                           "sync_diagnostics": _fetch(latest_sync, mesh)})
    if stop_after is not None and t >= stop_after and not final:
      if pending is not None:
        flush(pending)
      for closeable in (ckpt, writer, train_it, eval_it):
        if closeable is not None:
          closeable.close()
      return {"stopped_at": t}
  if pending is not None:
    last_row = flush(pending)
  wall = time.perf_counter() - t_wall

  if last_row is not None and last_row["step"] == rc.num_steps and "eval_loss" in last_row:
    final_eval = last_row["eval_loss"]   # evaluated at the last step already
  else:   # e.g. the run was already complete: evaluate the restored state
    final_eval = float(evaluate(algo.eval_params(state, rc.eval_params), eval_set))
  steps_run = rc.num_steps - start
  summary = {
      "algorithm": rc.algorithm, "num_workers": rc.M, "inner_steps": rc.H,
      "num_steps": rc.num_steps, "final_eval_loss": final_eval,
      "final_train_loss": None if last_row is None else last_row["train_loss"],
      "entropy_floor": floor,
      "gap_to_floor": None if floor is None else final_eval - floor,
      "bits_sent_per_worker": bits,
      "peak_bits_per_step": peak_bits,
      "dp_bits_sent_per_worker": rc.num_steps * dp_step_bits,
      "bits_ratio_dp_over_this": (rc.num_steps * dp_step_bits / bits) if bits else None,
      "wall_time_s": wall, "steps_this_run": steps_run,
      "tokens_per_s": tokens_per_step * steps_run / wall if steps_run else 0.0,
      "num_params": numel,
  }
  ckpt.close()
  train_it.close()
  eval_it.close()
  if writer is not None:
    writer.close()
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return summary


def format_summary(s: dict) -> str:
  lines = [f"{s['algorithm']}: M={s['num_workers']} H={s['inner_steps']} T={s['num_steps']} "
           f"({s['num_params']:,} params)",
           f"  final eval loss   {s['final_eval_loss']:.4f}"]
  if s["entropy_floor"] is not None:
    lines.append(f"  entropy floor     {s['entropy_floor']:.4f}  (gap {s['gap_to_floor']:.4f} nats)")
  lines.append(f"  bits sent/worker  {s['bits_sent_per_worker']:.4g}  (peak {s['peak_bits_per_step']:.4g} in one step)")
  lines.append(f"  data-parallel     {s['dp_bits_sent_per_worker']:.4g} bits/worker"
               + (f"  ({s['bits_ratio_dp_over_this']:.1f}x more)" if s["bits_ratio_dp_over_this"] else ""))
  lines.append(f"  wall time         {s['wall_time_s']:.1f} s, {s['tokens_per_s']:.0f} tokens/s")
  return "\n".join(lines)
