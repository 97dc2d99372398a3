"""Checkpoints with orbax (the only module that imports it).

A checkpoint is the complete training state pytree (outer and per-worker params, both optimizer
states, in-flight outer gradients, residuals, step, RNG) plus a JSON dict of host-side state (the data
iterator's position, the latest logged diagnostics), so a resumed run sees exactly the batches
and arithmetic the uninterrupted run would have.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diloco_jax.mesh import WORKER


class LayoutMismatch(ValueError):
  """A readable checkpoint holds a state of another layout than the one asked for (another
  model, algorithm or worker count): a config error, not a damaged checkpoint."""


class Checkpointer:
  """Saves every `every_steps` (asynchronously: the device-to-host copy happens before save()
  returns, the file writes overlap training) and restores the latest step."""

  def __init__(self, directory: str, max_to_keep: int | None = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        # Handlers named up front, so metadata can be read before any save or restore.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, host_state: dict, replace: bool = False) -> None:
    """Saves step `step`; with `replace`, a checkpoint of that step already saved is deleted
    first (otherwise saving a step twice is an error). The host state gets the state's layout
    (`_layout`), so a restore can tell another config from a damaged file."""
    if replace and step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    host_state = {**host_state, "state_layout": _layout(state)}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(host_state)))

  def restore(self, step: int, like_state: Any, fewer_workers: bool = False
              ) -> tuple[Any, dict]:
    """Restores onto the shapes, dtypes and shardings of `like_state` (arrays or abstract).

    A checkpoint whose layout differs raises `LayoutMismatch` before any array is read, except,
    with `fewer_workers`, one saved with more workers than `like_state` has: its per-worker
    leaves (sharded over WORKER) are read whole along the worker axis and cut to their first
    M workers; everything else (θ_g, the outer optimizer, the in-flight means, step, RNG) is
    restored as saved."""
    host = self._manager.restore(step, args=ocp.args.Composite(
        data=ocp.args.JsonRestore()))["data"]
    like_leaves, treedef = jax.tree.flatten(like_state)
    cut = _plan(host.get("state_layout"), like_leaves, fewer_workers)
    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if m is None else
                jax.ShapeDtypeStruct((m, *x.shape[1:]), x.dtype, sharding=_whole_workers(x))
                for x, m in zip(like_leaves, cut)]
    out = self._manager.restore(step, args=ocp.args.Composite(   # the JSON is read above
        state=ocp.args.StandardRestore(jax.tree.unflatten(treedef, abstract))))
    leaves = [y if m is None else _first_workers(y, x)
              for y, x, m in zip(jax.tree.leaves(out["state"]), like_leaves, cut)]
    return jax.tree.unflatten(treedef, leaves), host

  def restore_newest_readable(self, like_state: Any, set_aside: str, primary: bool = True,
                              fewer_workers: bool = False):
    """The newest checkpoint that can be read, restored like `restore`; None if there is none.

    A checkpoint that fails to read (a truncated or missing file, bad metadata) is moved, whole,
    into the directory `set_aside` (by the primary process, after every process has tried it:
    they agree on each step) and the next older one is tried, so nothing is deleted and the
    next save of that step does not collide with the broken copy. Returns (step, state, host
    state, [(skipped step, one-line reason), ...]) or None with the reasons. A readable
    checkpoint of another layout raises `LayoutMismatch` (nothing is moved)."""
    skipped = []
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      # A failed read leaves asyncio futures whose errors it would log when collected:
      # collected here, quietly (the reason is the one line the caller prints).
      asyncio_log = logging.getLogger("asyncio")
      level, asyncio_log.level = asyncio_log.level, logging.CRITICAL
      try:
        state, host = self.restore(step, like_state, fewer_workers)
        reason = None
      except LayoutMismatch as e:
        raise LayoutMismatch(f"checkpoint {step} in {self.directory} cannot be restored onto "
                             f"this run: {e}") from None
      except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
        reason = _reason(e)
        del e
        gc.collect()
      finally:
        asyncio_log.setLevel(level)
      if _all_processes_agree(reason is None):
        return step, state, host, skipped
      skipped.append((step, reason or "another process could not read it"))
      if primary:
        os.makedirs(set_aside, exist_ok=True)
        target = os.path.join(set_aside, str(step))
        if os.path.exists(target):
          target += f".{len(os.listdir(set_aside))}"
        os.rename(os.path.join(self.directory, str(step)), target)
      _barrier(f"diloco_jax_set_aside_{step}")
      self._manager.reload()
    return None, None, None, skipped

  def restore_saved(self, step: int) -> tuple[Any, dict]:
    """Restores the tree as saved, without a target, onto this process's first device (whatever
    devices or process count wrote it): for inspection and evaluation."""
    meta = self._manager.item_metadata(step)["state"]
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _is_worker_leaf(x) -> bool:
  """A leaf with a leading worker dimension: its sharding splits dimension 0 over WORKER."""
  spec = getattr(getattr(x, "sharding", None), "spec", None)
  if not spec or spec[0] is None:
    return False
  first = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return WORKER in first


def _layout(state) -> list:
  """[shape, dtype, per-worker] of every leaf, in flattening order (JSON)."""
  return [[list(x.shape), str(x.dtype), _is_worker_leaf(x)] for x in jax.tree.leaves(state)]


def _plan(saved, like_leaves, fewer_workers: bool) -> list:
  """For each leaf: None (restore as is) or the saved worker count M_s to cut to M; raises
  LayoutMismatch for a layout that cannot be restored onto `like_leaves`. A checkpoint without a
  recorded layout (older) is restored as is."""
  if saved is None:
    return [None] * len(like_leaves)
  if len(saved) != len(like_leaves):
    raise LayoutMismatch(f"it holds {len(saved)} arrays and this config's state "
                         f"{len(like_leaves)} (another algorithm, model or optimizer)")
  want = _layout(like_leaves)
  cut = []
  for i, ((s_shape, s_dtype, s_worker), (shape, dtype, worker)) in enumerate(zip(saved, want)):
    if (s_shape, s_dtype) == (shape, dtype):
      cut.append(None)
    elif (s_worker and worker and s_dtype == dtype and s_shape[1:] == shape[1:]
          and s_shape[0] > shape[0]):
      if not fewer_workers:
        raise LayoutMismatch(f"it was saved by {s_shape[0]} workers and this config has "
                             f"{shape[0]} (diloco.num_workers); set "
                             f"train.allow_fewer_workers=True to resume with its first "
                             f"{shape[0]} workers")
      cut.append(s_shape[0])
    else:
      raise LayoutMismatch(f"array {i} was saved as {s_dtype}{s_shape} and this config's "
                           f"state has {dtype}{shape}")
  return cut


def _whole_workers(x) -> NamedSharding:
  """x's sharding with the worker dimension not split: every worker's rows on each device."""
  s = x.sharding
  return NamedSharding(s.mesh, P(None, *s.spec[1:]), memory_kind=s.memory_kind)


def _first_workers(saved, like):
  """The first M = like.shape[0] workers' rows of `saved`, in like's sharding."""
  return jax.jit(lambda a: a[:like.shape[0]], out_shardings=like.sharding)(saved)


def _reason(e: BaseException, limit: int = 200) -> str:
  """The root cause of a failed read, on one line."""
  while e.__cause__ is not None:
    e = e.__cause__
  line = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
  line = line.split(". See full TensorStore details")[0]
  line = f"{type(e).__name__}: {line}"
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _all_processes_agree(ok: bool) -> bool:
  """ok on every process (one small all-gather in a multi-process run)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)
