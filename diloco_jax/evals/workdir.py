"""A training run's workdir -> the parameters of its latest checkpoint -> every evaluation.

Takes the run's `config.RunConfig` (the command line builds it from the workdir's saved config)
and rebuilds the run's objects with `build`; reads `WORKDIR/checkpoints` through
`diloco_jax.checkpoint` (the only orbax import).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from diloco_jax import build, checkpoint, data
from diloco_jax import mesh as mesh_lib
from diloco_jax import model as model_lib
from diloco_jax.config import RunConfig
from diloco_jax.evals import heldout
from diloco_jax.evals import multiple_choice as mc
from diloco_jax.evals.tasks import Example


class EvalError(ValueError):
  """The workdir cannot be evaluated as asked; the message is one sentence."""


def _host_device() -> jax.Device:
  """Where the checkpoint is restored: host memory when there is a CPU backend (the whole
  training state, M worker copies and optimizer moments included, may not fit one accelerator)."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return jax.devices()[0]


def load_run_config(workdir: str) -> RunConfig:
  """The RunConfig a run was started with, from its WORKDIR/config.json."""
  import json  # noqa: PLC0415

  import ml_collections  # noqa: PLC0415

  from diloco_jax.config import from_config_dict  # noqa: PLC0415
  path = os.path.join(workdir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return from_config_dict(ml_collections.ConfigDict(json.load(f)))
  except (OSError, ValueError) as e:
    raise EvalError(f"cannot read the run's config {path!r}: {e}") from None


def restore_params(workdir: str, rc: RunConfig, which: str) -> tuple[dict, int]:
  """(params, step): `algo.eval_params(state, which)` of the latest checkpoint in `workdir`.

  The restore target is the run's own state built abstractly (`jax.eval_shape` of the run's
  algorithm's `init`) and placed on one device, so any number of devices can read a checkpoint
  saved on any mesh (restoring "as saved" needs the devices the run had).
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise EvalError(f"workdir {workdir!r} has no checkpoints directory.")
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise EvalError(f"{ckpt_dir!r} holds no finished checkpoint.")
    key = jax.random.PRNGKey(rc.seed)
    abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, rc.model), key)
    algo = build.make_algorithm(rc, mesh_lib.make_mesh(rc.diloco.num_workers), abstract_params)
    device = jax.sharding.SingleDeviceSharding(_host_device())
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        jax.eval_shape(algo.init, abstract_params, key))
    try:
      state, _ = ckpt.restore(step, like)
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise EvalError(f"the checkpoint at step {step} in {ckpt_dir!r} does not match the run's "
                      f"config (algorithm {rc.algorithm!r}, M={rc.diloco.num_workers}, "
                      f"model {rc.model}): {first}") from None
  finally:
    ckpt.close()
  try:
    params = algo.eval_params(state, which)
  except ValueError as e:   # e.g. worker copies of a data-parallel run
    raise EvalError(f"cannot evaluate params={which!r}: {e}") from None
  return jax.device_put(params, jax.devices()[0]), step


def evaluate_workdir(workdir: str, rc: RunConfig, *, which: str | None = None,
                     tasks: Mapping[str, Sequence[Example]] | None = None,
                     heldout_batches: int | None = None, batch_size: int = 16) -> dict:
  """Held-out loss, per-position loss and multiple-choice accuracies of the latest checkpoint.

  Args:
    workdir: the run's directory (``checkpoints/`` inside).
    rc: the run's config, as `config.from_config_dict` returns it.
    which: "outer", "worker_mean" or "worker0" (None: the run's ``eval.params``).
    tasks: task name -> examples (`tasks.load_*`); needs a byte-level (text) run.
    heldout_batches: held-out batches of ``eval.batch_size`` sequences (None: the run's
      ``eval.num_batches``, so the loss matches the run's final ``eval_loss``).
    batch_size: choices scored per call.

  Returns:
    A JSON-serialisable dict: ``heldout_loss``, ``per_position_loss`` (list of L floats),
    ``per_position_buckets`` ([first, last, loss] triples), ``tasks`` (name -> accuracies) and
    the run's identity (``step``, ``params``, ``algorithm``, ...).
  """
  which = which or rc.eval.params
  tasks = dict(tasks or {})
  L = rc.data.seq_len
  if tasks and (rc.data.source != "text" or rc.model.vocab_size < 256
                or rc.data.tokenizer != "bytes"):
    raise EvalError(f"multiple-choice tasks feed UTF-8 bytes to the model, but this run trained "
                    f"on data.source={rc.data.source!r} with a vocabulary of "
                    f"{rc.model.vocab_size}; they need a data.source='text' run.")
  params, step = restore_params(workdir, rc, which)
  apply_fn = heldout.model_apply(rc.model)
  source = build.make_source(rc, "eval")
  batches = heldout.heldout_set(source, seq_len=L, batch_size=rc.eval.batch_size,
                                num_batches=heldout_batches or rc.eval.num_batches, seed=rc.seed)
  loss, per_position = jax.device_get(heldout.heldout_losses(apply_fn, params, batches))
  return {
      "workdir": os.path.abspath(workdir), "step": step, "algorithm": rc.algorithm,
      "params": which, "data_source": rc.data.source, "seq_len": L,
      "heldout_sequences": int(batches.shape[0] * batches.shape[1]),
      "heldout_loss": float(loss), "entropy_floor": data.entropy_floor(source),
      "per_position_loss": [float(x) for x in np.asarray(per_position)],
      "per_position_buckets": [list(b) for b in heldout.position_buckets(per_position)],
      "tasks": {name: mc.evaluate(apply_fn, params, examples, max_len=L,
                                  batch_size=batch_size)
                for name, examples in tasks.items()},
  }
