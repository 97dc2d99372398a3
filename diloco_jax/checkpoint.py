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
    first (otherwise saving a step twice is an error)."""
    if replace and step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(host_state)))

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
    """Restores onto the shapes, dtypes and shardings of `like_state` (arrays or abstract)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def restore_newest_readable(self, like_state: Any, set_aside: str, primary: bool = True):
    """The newest checkpoint that can be read, restored like `restore`; None if there is none.

    A checkpoint that fails to read (a truncated or missing file, bad metadata) is moved, whole,
    into the directory `set_aside` (by the primary process, after every process has tried it:
    they agree on each step) and the next older one is tried, so nothing is deleted and the
    next save of that step does not collide with the broken copy. Returns (step, state, host
    state, [(skipped step, one-line reason), ...]) or None with the reasons."""
    skipped = []
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      # A failed read leaves asyncio futures whose errors it would log when collected:
      # collected here, quietly (the reason is the one line the caller prints).
      asyncio_log = logging.getLogger("asyncio")
      level, asyncio_log.level = asyncio_log.level, logging.CRITICAL
      try:
        state, host = self.restore(step, like_state)
        reason = None
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
