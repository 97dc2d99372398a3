"""The host loop: config -> data, model, algorithm; dispatch, eval, checkpoints, metrics.

`run` first turns the ConfigDict into a `config.RunConfig` (which fails with one sentence naming
the key before anything is compiled), builds the run's objects with `build`, then trains. In the
steady state the loop never waits on a device value: metrics are fetched one logged step late.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diloco_jax import build, checkpoint, data, distributed
from diloco_jax import host as host_lib
from diloco_jax import preemption as preemption_lib
from diloco_jax import config as config_lib
from diloco_jax import mesh as mesh_lib
from diloco_jax import metrics as metrics_lib
from diloco_jax import model as model_lib
from diloco_jax.model import moe as moe_lib
from diloco_jax.config import ConfigError, InputError, RunConfig  # noqa: F401  (its errors)


class Diverged(RuntimeError):
  """Every worker's outer gradient of a sync was non-finite (the run saved and stopped)."""


@functools.lru_cache(maxsize=None)
def _eval_fn(model_cfg: model_lib.ModelConfig):
  def mean_loss(params, batches_NxBxL):
    losses = jax.lax.map(lambda b: model_lib.loss_fn(model_cfg, params, b, train=False)[1]["ce"],
                         batches_NxBxL)
    return jnp.mean(losses)
  return jax.jit(mean_loss)


@functools.lru_cache(maxsize=None)
def _router_fn(model_cfg: model_lib.ModelConfig):
  """(workers' params [M, ...], tokens [B, L]) -> the routers' agreement (`moe.router_agreement`)
  as sync diagnostics, per MoE block ("router/b{i}/…") and averaged ("router/…")."""
  blocks = model_cfg.moe_blocks

  def agreement(local_params, tokens_BxL):
    choices = jax.vmap(lambda p: model_lib.apply(model_cfg, p, tokens_BxL, train=False)[1])(
        local_params)["moe"]["experts"]   # [M, N, B, L, k]
    M, N = choices.shape[:2]
    routers = jnp.stack([local_params["blocks"][i]["mlp"]["router"] for i in blocks], axis=1)
    a = moe_lib.router_agreement(choices.reshape(M, N, -1, choices.shape[-1]), routers)
    out = {f"router/{k}": jnp.mean(v) for k, v in a.items()}
    out.update({f"router/b{i}/{k}": v[n] for k, v in a.items() for n, i in enumerate(blocks)})
    return out
  return jax.jit(agreement)


def _has_checkpoint(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return False
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


def _initial_params(init_from: str, like: dict) -> dict:
  """The outer params of `init_from`'s latest checkpoint, laid out like `like` (this run's
  fresh params: same shapes required, e.g. the same model at another sequence length)."""
  from diloco_jax.evals import workdir as workdir_lib  # noqa: PLC0415
  try:
    other = workdir_lib.load_run_config(init_from)
    params, _ = workdir_lib.restore_params(init_from, other, "outer")
  except workdir_lib.EvalError as e:
    raise ConfigError(f"train.init_from: {e}") from None
  shapes = jax.tree.map(lambda x: x.shape, params)
  if jax.tree.structure(params) != jax.tree.structure(like) or shapes != jax.tree.map(
      lambda x: x.shape, like):
    raise ConfigError(f"train.init_from={init_from!r} holds a model of other shapes than "
                      f"this run's model.*; only data, RoPE and training keys may differ")
  return jax.tree.map(lambda x, y: jax.device_put(x, y.sharding), params, like)


@functools.lru_cache(maxsize=None)
def _replicator(mesh):
  return jax.jit(lambda tree: tree, out_shardings=mesh_lib.replicated(mesh))


def _fetch(values: dict, mesh) -> dict:
  """Device metrics -> floats (the one place the loop reads device values). Per-worker values
  spread over processes are first gathered onto every device (one small program)."""
  leaves = jax.tree.leaves(values)   # the loss's aux is a nested dict
  if any(not v.is_fully_addressable for v in leaves if isinstance(v, jax.Array)):
    values = _replicator(mesh)(values)
  out = {}
  for k, v in jax.device_get(values).items():
    out.update(_scalars(k, v))
  return out


def _scalars(key: str, v) -> dict:
  """One metric -> scalar rows. A per-worker value [M] (or a sync diagnostic []) becomes its
  mean over workers; a wider one [M, n, ...] (e.g. an expert-load histogram) is averaged over
  workers and gives one row per entry, "key/i[/j...]"; a dict (the loss's aux) is flattened."""
  if isinstance(v, dict):
    out = {}
    for k, x in v.items():
      out.update(_scalars(k, x))
    return out
  v = np.asarray(v)
  if v.ndim <= 1:
    return {key: float(np.mean(v))}   # per-worker values [M] -> their mean (also for M = 1)
  mean = np.mean(v, axis=0)
  return {f"{key}/{'/'.join(map(str, i))}": float(mean[i]) for i in np.ndindex(mean.shape)}


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

  SIGTERM (what TPU VMs and SLURM send before preempting) ends the run after the step in
  progress with a checkpoint of that step and returns {"stopped_at": t, "preempted": True};
  running again resumes bit for bit. With several processes they all stop at the same step.
  """
  rc = config_lib.from_config_dict(config)   # every config error, before anything compiles
  config_lib.check_workdir(workdir)          # and a workdir that cannot be one
  M, T, B, L = rc.diloco.num_workers, rc.train.num_steps, rc.train.batch_size, rc.data.seq_len
  source = build.make_source(rc)
  eval_source = build.make_source(rc, "eval") if rc.data.source == "text" else source
  devices = jax.devices()
  per_worker = rc.mesh.data * rc.mesh.expert * rc.mesh.context * rc.mesh.model
  if len(devices) < per_worker:
    raise ConfigError(f"mesh.data * mesh.expert * mesh.context * mesh.model = {per_worker} "
                      f"exceeds the "
                      f"{len(devices)} available devices")
  key = jax.random.PRNGKey(rc.seed)
  init_key, algo_key = jax.random.split(key)
  mesh = build.make_mesh(rc)
  primary = distributed.is_primary()
  # Built under jit straight into the sharded layout, so every process holds its part of the
  # same global arrays (a process cannot device_put onto another's devices) and no device ever
  # holds a whole copy of a sharded leaf.
  params = build.init_params(rc, mesh, init_key)
  if rc.train.init_from and not _has_checkpoint(workdir):   # a resumed run keeps its own
    params = _initial_params(rc.train.init_from, params)
  algo = build.make_algorithm(rc, mesh, params)
  state = algo.init(params, algo_key)
  numel = sum(x.size for x in jax.tree.leaves(params))
  # MoE under DiLoCo: the workers' routers compared on the same held-out tokens at the steps
  # whose sync carries a router (measured on the parameters just before that step).
  router_frags = set()
  if rc.model.moe is not None and rc.algorithm != "dp":
    router_frags = {algo.fragments.leaf_fragment[i] for i, (path, leaf) in enumerate(
        jax.tree_util.tree_flatten_with_path(params)[0]) if config_lib.is_router(path, leaf)}
  del params

  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch_shape = (M, B, L + 1)
  my_workers, my_rows = mesh_lib.process_batch_rows(mesh, batch_shape)
  train_it = data.make_batches(source, num_workers=M, batch_size=B, seq_len=L, seed=rc.seed,
                               split="train", workers=my_workers)
  eval_it = data.make_batches(eval_source, num_workers=1, batch_size=rc.eval.batch_size,
                              seq_len=L, seed=rc.seed, split="eval")
  eval_set = jax.make_array_from_process_local_data(
      mesh_lib.replicated(mesh), np.stack([next(eval_it)[0]
                                           for _ in range(rc.eval.num_batches)]))
  evaluate = _eval_fn(rc.model)
  router_tokens = eval_set[0, :, :-1] if router_frags else None
  floor = data.entropy_floor(source)
  # nats per token -> bits per byte (text runs), so runs with other tokenizers compare.
  bpt = data.bytes_per_token(eval_source)
  to_bpb = (lambda nats: nats / (np.log(2.0) * bpt)) if bpt else None

  if primary:   # what the run was (evals rebuild the model from it)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=rc.checkpoint.max_to_keep)
  start, restored_sync = 0, {}
  if ckpt.latest_step() is not None:   # resume from the newest checkpoint that reads
    unreadable = os.path.join(workdir, "unreadable_checkpoints")
    try:
      start, restored, host_state, skipped = ckpt.restore_newest_readable(
          state, unreadable, primary, fewer_workers=rc.train.allow_fewer_workers)
    except checkpoint.LayoutMismatch as e:
      raise InputError(f"{e}; resume with the config that wrote it ({workdir}/config.json is "
                       f"the latest run's) or use another workdir") from None
    for step, reason in skipped if primary else ():
      print(f"checkpoint {step} in {workdir} cannot be read ({reason}); moved it to "
            f"{unreadable} and trying the one before", flush=True)
    if start is None:
      raise InputError(f"no checkpoint in {workdir} can be read (all moved to {unreadable}); "
                       f"run again to start from step 0, or restore them by hand")
    state = restored
    saved_m = host_state.get("num_workers", M)
    if saved_m != M:   # train.allow_fewer_workers: the first M workers' state went on
      train_it.set_state(data.state_for_fewer_workers(host_state["data_iterator"], saved_m,
                                                      train_it))
    else:
      train_it.set_state(host_state["data_iterator"])
    restored_sync = host_state["sync_diagnostics"]
    if primary:
      print(f"resumed from step {start} in {workdir}" + (
          f" with the first {M} of its {saved_m} workers (the others' parameters and inner "
          f"optimizer state since their last sync are dropped; θ_g and the outer optimizer "
          f"carry on)" if saved_m != M else ""), flush=True)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start) if primary else None
  progress = metrics_lib.Progress(
      T, start, prefix=f"[process {jax.process_index()}] " if log_all_processes
      else "") if primary or log_all_processes else None
  tokens_per_step = M * B * L
  final_sync = rc.train.final_sync

  def bits_at(s: int) -> int:   # what one worker sends at step s (the final sync after T)
    return algo.bits_sent(s) + (algo.final_bits(s) if final_sync and s == T else 0)

  # Bits are a deterministic function of the static schedule: recomputed, not checkpointed.
  bits = sum(bits_at(s) for s in range(1, start + 1))
  dp_step_bits = build.dp_bits_per_step(rc, numel)
  peak_bits = max((bits_at(s) for s in range(1, T + 1)), default=0)
  eval_every, ckpt_every = rc.eval.every_steps, rc.checkpoint.every_steps

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
    if to_bpb:
      row.update({f"{k}_bits_per_byte": float(to_bpb(row[f"{k}_loss"]))
                  for k in ("train", "eval") if f"{k}_loss" in row})
    if writer is not None:
      writer.write(step, row)
    if progress is not None:
      progress.line(step, row["train_loss"], tps, row.get("eval_loss"), _console_extras(row))
    return {"step": step, **row}

  last_row, latest_sync = None, dict(restored_sync)
  watched = []   # (step, fragment, device count of quarantined workers), read when rows are

  def all_quarantined(before=None):
    """The first watched sync before step `before` (default: all) at which every worker was
    quarantined, as (step, p), or None. Read with the logged rows, whose values are no older
    than those syncs', so this adds no wait."""
    ready = [w for w in watched if before is None or w[0] < before]
    if not ready:
      return None
    counts = jax.device_get([v for _, _, v in ready])
    del watched[:len(ready)]   # watched is in step order
    return next(((s, p) for (s, p, _), c in zip(ready, counts) if c >= M), None)
  # SIGTERM (a preemption notice) is heard only while training: then the step in progress
  # finishes, a checkpoint is saved and the run returns (preemption.py).
  with preemption_lib.Preemption() as preemption:
    for t in range(start + 1, T + 1):
      # This process's rows only; the global [M, B, L+1] array is assembled from every process's.
      batch = jax.tree.map(   # a token array, or a packed dict of arrays (`packing`)
          lambda x: jax.make_array_from_process_local_data(
              batch_sharding, x[:, my_rows], (M, B, *x.shape[2:])), next(train_it))
      if t == start + 1:   # every program of the run compiled before the clock starts
        _compile_ahead(algo, state, batch, T if final_sync else 0, evaluate, eval_set,
                       rc.eval.params)
        t_wall = t_log = time.perf_counter()
      if router_frags and router_frags.intersection(algo.schedule.sends(t)):
        latest_sync.update(_router_fn(rc.model)(state.local_params, router_tokens))
      state, m = algo.step(state, batch, t)
      if final_sync and t == T:   # θ_g takes in every inner step before it is evaluated and saved
        state, m_final = algo.final_sync(state, t)
        m = {**m, **m_final}
      watched.extend((t, int(k.split("/")[1]), v) for k, v in m.items()
                     if k.startswith("quarantined/"))
      bits += bits_at(t)
      # Sync diagnostics come from the steps that send; keep the latest per fragment (still on
      # device) so that every logged row carries them.
      latest_sync.update((k, v) for k, v in m.items() if k not in ("loss", "aux"))
      if pending is not None:   # the previous logged step's values are ready by now
        last_row = flush(pending)
        pending = None
        bad = all_quarantined(before=t)
        if bad:
          _stop_diverged(bad, t, algo, state, ckpt, train_it, latest_sync, mesh, workdir,
                         (writer, train_it, eval_it))
      final = t == T
      if t % rc.train.log_every == 0 or final or (eval_every and t % eval_every == 0):
        if (eval_every and t % eval_every == 0) or final:
          m["eval_loss"] = evaluate(algo.eval_params(state, rc.eval.params), eval_set)
        m = {**latest_sync, **m}
        host = {"tokens_seen": t * tokens_per_step, "bits_sent_per_worker": bits,
                "bits_this_step": bits_at(t), "dp_bits_sent_per_worker": t * dp_step_bits}
        pending = (t, m, host)
      preempted = not final and preemption.reached(t)
      if (ckpt_every and t % ckpt_every == 0) or final or preempted:
        if pending is not None and pending[0] == t:
          # Row t is written before the checkpoint that covers it: rows are logged a step late,
          # and a run killed between this checkpoint and the next step resumes at t + 1, so it
          # would never log step t. Saving reads the state to the host anyway: no extra wait.
          last_row = flush(pending)
          pending = None
        bad = all_quarantined()   # read before this checkpoint saves anything
        if bad:
          _stop_diverged(bad, t, algo, state, ckpt, train_it, latest_sync, mesh, workdir,
                         (writer, train_it, eval_it))
        ckpt.save(t, state, _host_state(train_it, latest_sync, mesh, M))
      if (preempted or stop_after is not None and t >= stop_after) and not final:
        if pending is not None:
          flush(pending)
        for closeable in (ckpt, writer, train_it, eval_it):
          if closeable is not None:
            closeable.close()
        if preempted:
          if primary:
            print(f"preempted (SIGTERM): saved the checkpoint of step {t} of {T} in {workdir}; "
                  f"the same command resumes from it", flush=True)
          return {"stopped_at": t, "preempted": True}
        return {"stopped_at": t}
  if pending is not None:
    last_row = flush(pending)
  bad = all_quarantined()
  if bad:
    _stop_diverged(bad, T, algo, state, ckpt, train_it, latest_sync, mesh, workdir,
                   (writer, train_it, eval_it))
  wall = time.perf_counter() - t_wall

  if last_row is not None and last_row["step"] == T and "eval_loss" in last_row:
    final_eval = last_row["eval_loss"]   # evaluated at the last step already
  else:   # e.g. the run was already complete: evaluate the restored state
    final_eval = float(evaluate(algo.eval_params(state, rc.eval.params), eval_set))
  steps_run = T - start
  summary = {
      "algorithm": rc.algorithm, "num_workers": M, "inner_steps": rc.diloco.inner_steps,
      "num_steps": T, "final_eval_loss": final_eval,
      "final_eval_bits_per_byte": float(to_bpb(final_eval)) if to_bpb else None,
      "final_train_loss": None if last_row is None else last_row["train_loss"],
      "entropy_floor": floor,
      "gap_to_floor": None if floor is None else final_eval - floor,
      "bits_sent_per_worker": bits,
      "peak_bits_per_step": peak_bits,
      "dp_bits_sent_per_worker": T * dp_step_bits,
      "bits_ratio_dp_over_this": (T * dp_step_bits / bits) if bits else None,
      "wall_time_s": wall, "steps_this_run": steps_run,
      "tokens_per_s": tokens_per_step * steps_run / wall if steps_run else 0.0,
      "num_params": numel,
      "active_params": model_lib.param_counts(rc.model)[1],
      "active_flops_per_token": model_lib.flops_per_token(rc.model, L),
      "host": host_lib.describe(),   # which runs can agree to the bit (diloco_jax/host.py)
  }
  ckpt.close()
  train_it.close()
  eval_it.close()
  if writer is not None:
    writer.close()
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return summary


def _host_state(train_it, latest_sync, mesh, M: int) -> dict:
  """What a checkpoint keeps besides the arrays: the data position, the latest sync diagnostics
  (floats, read where orbax copies the state to the host anyway, so a resumed run logs the
  same) and the worker count (a run with fewer workers can resume from it)."""
  return {"data_iterator": train_it.get_state(), "sync_diagnostics": _fetch(latest_sync, mesh),
          "num_workers": M}


def _stop_diverged(bad, t, algo, state, ckpt, train_it, latest_sync, mesh, workdir, others):
  """Every worker was quarantined at sync `bad` = (step, fragment): θ_g never took that
  sync's Δ, so restart every worker from it, save that state as step t's checkpoint, stop."""
  step, p = bad
  state = algo.restart_workers(state, range(algo.M), reset_inner_opt=True)
  ckpt.save(t, state, _host_state(train_it, latest_sync, mesh, algo.M), replace=True)
  ckpt.close()
  for closeable in others:
    if closeable is not None:
      closeable.close()
  raise Diverged(f"every worker's outer gradient of fragment {p} was non-finite at step {step}, "
                 f"so the run stopped; the checkpoint of step {t} in {workdir} holds the last good "
                 f"state (the outer copy θ_g, which no non-finite Δ reached, with every worker "
                 f"restarted from it)")


def _compile_ahead(algo, state, batch, final_step: int, evaluate, eval_set,
                   which: str) -> None:
  """Compiles every program the run dispatches (the inner step, each fragment's sync or send
  and receives, the final sync, the evaluation) for the run's arguments, before step 1: the
  first progress interval then times training alone, and a program that cannot be built fails
  before anything trains. jit's cache keeps the executables, so the run's calls do not compile
  again (tests/test_train.py counts the compilations)."""
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  for _, program, args in algo.programs(jax.tree.map(abstract, state),
                                        jax.tree.map(abstract, batch), final_step=final_step):
    program.lower(*args).compile()
  evaluate.lower(jax.tree.map(abstract, algo.eval_params(state, which)), eval_set).compile()


def _console_extras(row: dict) -> dict:
  """The MoE's headline numbers for the progress line (empty for a dense model)."""
  if "moe/load_balance_loss" not in row:
    return {}
  return {"lb": f"{row['moe/load_balance_loss']:.3f}",
          "H(load)": f"{row['moe/load_entropy']:.2f}",
          "drop": f"{100 * row['moe/dropped_fraction']:.1f}%"}


def format_summary(s: dict) -> str:
  active = s.get("active_params", s["num_params"])
  sparse = f", {active:,} active" if active != s["num_params"] else ""
  lines = [f"{s['algorithm']}: M={s['num_workers']} H={s['inner_steps']} T={s['num_steps']} "
           f"({s['num_params']:,} params{sparse}, "
           f"{s.get('active_flops_per_token', 0) / 1e6:.2f} MFLOP/token)",
           f"  final eval loss   {s['final_eval_loss']:.4f}"
           + (f"  ({s['final_eval_bits_per_byte']:.4f} bits/byte)"
              if s.get("final_eval_bits_per_byte") else "")]
  if s["entropy_floor"] is not None:
    lines.append(f"  entropy floor     {s['entropy_floor']:.4f}  (gap {s['gap_to_floor']:.4f} nats)")
  lines.append(f"  bits sent/worker  {s['bits_sent_per_worker']:.4g}  (peak {s['peak_bits_per_step']:.4g} in one step)")
  lines.append(f"  data-parallel     {s['dp_bits_sent_per_worker']:.4g} bits/worker"
               + (f"  ({s['bits_ratio_dp_over_this']:.1f}x more)" if s["bits_ratio_dp_over_this"] else ""))
  lines.append(f"  wall time         {s['wall_time_s']:.1f} s, {s['tokens_per_s']:.0f} tokens/s")
  return "\n".join(lines)
