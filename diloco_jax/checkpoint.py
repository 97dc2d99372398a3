"""Checkpoints with orbax (the only module that imports it).

A checkpoint is the complete training state pytree (outer and per-worker params, both optimizer
states, in-flight outer gradients, residuals, step, RNG) plus a JSON dict of host-side state (the data
iterator's position, the latest logged diagnostics), so a resumed run sees exactly the batches
and arithmetic the uninterrupted run would have.
"""

from __future__ import annotations

import os
from typing import Any

import jax
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

  def save(self, step: int, state: Any, host_state: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(host_state)))

  def restore(self, step: int, like_state: Any) -> tuple[Any, dict]:
    """Restores onto the shapes, dtypes and shardings of `like_state` (arrays or abstract)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like_state)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

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
