"""A `config.RunConfig` -> the objects a run is made of: data source, algorithm, counts.

Shared by the trainer (train.py), the ahead-of-time check (aot.py), the evaluations (evals/) and
the experiments (bench.py), so each builds exactly what `python -m diloco_jax.main` trains.
Streaming DiLoCo's fragments come from `config.make_fragments` (the same function checks them on
shapes when the RunConfig is built).
"""

from __future__ import annotations

import functools

import jax

from diloco_jax import algorithm, collectives, data, faults, inner, outer, retrieval, sharding
from diloco_jax import tokenizer
from diloco_jax import mesh as mesh_lib
from diloco_jax import model as model_lib
from diloco_jax.config import ConfigError, RunConfig, make_fragments, param_specs, sync_every


def cpu_devices_for(rc: RunConfig) -> int:
  """How many simulated host devices the entry points ask for: mesh.num_cpu_devices, else one
  per worker, data, expert, context and model shard."""
  m = rc.mesh
  return m.num_cpu_devices or rc.diloco.num_workers * m.data * m.expert * m.context * m.model


def make_source(rc: RunConfig, split: str = "train"):
  """The data source of `split` ("train" or "eval"; the synthetic source serves both)."""
  d = rc.data
  if d.source == "synthetic":
    return data.SyntheticLanguage(vocab_size=d.vocab_size, num_classes=d.num_classes,
                                  seed=rc.seed)
  if d.tokenizer != tokenizer.BYTES:   # subword: shards prepared once, then reused
    files = list(d.files)
    out = tokenizer.cache_dir(files, d.tokenizer, d.token_cache)
    return tokenizer.TokenShards(tokenizer.prepare(files, d.tokenizer, out), split)
  try:
    text = data.TextBytes(list(d.files), seq_len=d.seq_len, split=split,
                          check_utf8=d.check_utf8)
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"data.paths: {e}") from None
  # Retrieval episodes are mixed into the training windows only: the held-out loss stays plain
  # language modelling on the held-out text (needle recall is its own evaluation).
  if split == "train" and d.retrieval.fraction:
    return retrieval.RetrievalMix(text, d.retrieval)
  return text


def make_mesh(rc: RunConfig, devices=None):
  """The (worker, data, expert, context, model) mesh of the config over `devices` (default:
  all)."""
  try:
    return mesh_lib.make_mesh(rc.diloco.num_workers, rc.mesh.data, rc.mesh.model, devices,
                              expert=rc.mesh.expert, context=rc.mesh.context)
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None


def init_params(rc: RunConfig, mesh, key: jax.Array):
  """Fresh params, initialised under jit straight into their sharded layout (each device makes
  only its own shards; every process holds its part of the same global arrays)."""
  init = functools.partial(model_lib.init_params, rc.model)
  specs = param_specs(mesh, jax.eval_shape(init, key))
  return jax.jit(init, out_shardings=sharding.named(mesh, specs))(key)


def make_algorithm(rc: RunConfig, mesh, params):
  """DataParallel, DiLoCo or StreamingDiLoCo with the config's optimizers, on `mesh`, with the
  params sharded by the rule table; `params` (concrete or abstract) give the fragments and the
  shardings their structure."""
  t, d = rc.train, rc.diloco
  loss_fn = functools.partial(model_lib.loss_fn, rc.model,
                              constrain=sharding.activation_constraint(mesh))
  specs = param_specs(mesh, params)
  inner_opt = inner.inner_optimizer(
      t.learning_rate, t.num_steps, warmup_steps=t.warmup_steps,
      final_lr_fraction=t.final_lr_fraction, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
      grad_clip=t.grad_clip)
  if rc.algorithm == "dp":
    return algorithm.DataParallel(loss_fn, inner_opt, num_workers=d.num_workers, mesh=mesh,
                                  param_specs=specs)
  # A cosine outer η decays over a fragment's T / H outer steps, to the inner schedule's end
  # fraction (a fragment synced more often, the MoE routers', holds the end value earlier).
  outer_opt = outer.outer_optimizer(d.outer_optimizer, d.outer_lr, d.outer_momentum,
                                    schedule=d.outer_lr_schedule,
                                    num_outer_steps=t.num_steps // d.inner_steps,
                                    final_fraction=t.final_lr_fraction)
  common = dict(num_workers=d.num_workers, inner_steps=d.inner_steps, mesh=mesh,
                codec=d.quantizer, wire=d.wire, error_feedback=d.error_feedback,
                param_specs=specs, offload_outer=d.offload_outer,
                # DiLoCo: one fragment, plus the routers' own with diloco.router_sync_every.
                fragments=make_fragments(rc, params), sync_every=sync_every(rc),
                delay=d.delay, quarantine=d.quarantine,
                faults=faults.FaultSchedule(d.num_workers, d.drop_prob, d.outages, seed=rc.seed,
                                            reset_inner_opt=d.rejoin_reset_inner_opt))
  if rc.algorithm == "diloco":
    return algorithm.DiLoCo(loss_fn, inner_opt, outer_opt, **common)
  return algorithm.StreamingDiLoCo(
      loss_fn, inner_opt, outer_opt, overlap_steps=d.worker_overlap_steps or d.overlap_steps,
      merge_alpha=d.merge_alpha, **common)


def dp_bits_per_step(rc: RunConfig, numel: int) -> int:
  """What data-parallel training of the same model would send per step (fp32 ring all-reduce)."""
  return collectives.ring_allreduce_bits(numel, 32, rc.diloco.num_workers)
