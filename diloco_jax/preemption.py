"""SIGTERM as a preemption notice: finish the step in progress, checkpoint, exit 0.

TPU VMs and SLURM send SIGTERM some time before they take the machine away. One process: our
handler only sets a flag, which the host loop reads after each step (no device value is
involved, so the check costs nothing). Several processes must stop at the *same* step, because
saving a checkpoint is collective: JAX's preemption service (started by jax.distributed) hears
the signal on whichever process gets it, agrees with the others on the next step every process
can still reach, and `multihost_utils.reached_preemption_sync_point(t)` turns True there on
all of them.
"""

from __future__ import annotations

import signal
import threading

from jax._src import distributed as _distributed
from jax.experimental import multihost_utils


class Preemption:
  """`with Preemption() as p: ... if p.reached(t): save and stop`."""

  def __init__(self):
    self._notified = False
    self._previous = None

  @staticmethod
  def _multi_process() -> bool:
    return _distributed.global_state.client is not None

  def __enter__(self) -> "Preemption":
    # Signal handlers can only be installed from the main thread (a run started from another
    # thread, e.g. a notebook's worker, is then not preemptible by SIGTERM, as before).
    if not self._multi_process() and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handler(self, signum, frame) -> None:
    del signum, frame
    self._notified = True

  def reached(self, step: int) -> bool:
    """Whether the run must checkpoint and stop after `step` (every process of a run gets the
    same answer for the same step)."""
    if self._multi_process():
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notified
