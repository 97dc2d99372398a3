"""Who reports at each sync: simulated lost and late workers (issue 13, SPEC §5 "dropping").

A `FaultSchedule` says, for every sync of fragment p at step t, which of the M workers' outer
gradients reach the all-reduce (`mask(t, p)`), and at which steps a worker comes back from an
outage (`rejoining(t)`). It is a pure function of its arguments (the drop draws are seeded by
(seed, t, p), nothing is carried), so the host knows it at every step without reading the device,
a resumed run sees the same faults, and the bits counted are exactly what was sent.

* `drop_prob`: each worker's outer gradient is dropped independently at every sync with this
  probability (DiLoCo's ablation: a worker that failed or arrived late for that sync).
* `outages`: (worker, step, duration) triples: the worker is gone for steps
  step, ..., step + duration − 1 (it misses every sync in them) and rejoins at step + duration.

What the algorithm does with a mask (algorithm.py): the mean is over the workers that report; a
worker that did not report a fragment takes θ_{g,p} for it at that sync's merge instead of the
α-mix; a rejoining worker restarts wholly from θ_g (and, with `reset_inner_opt`, with fresh Adam
moments). In simulation a worker keeps computing during its outage (its devices are shared with
the others anyway); what it computed is discarded when it rejoins.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diloco_jax import checks


@dataclasses.dataclass(frozen=True)
class FaultSchedule:
  num_workers: int
  drop_prob: float = 0.0
  outages: tuple[tuple[int, int, int], ...] = ()
  seed: int = 0
  reset_inner_opt: bool = False

  def __post_init__(self):
    M = checks.integer("num_workers (M)", self.num_workers, 1)
    if (isinstance(self.drop_prob, bool) or not isinstance(self.drop_prob, (int, float))
        or not 0.0 <= self.drop_prob < 1.0):
      raise ValueError(f"diloco.drop_prob must be a number in [0, 1), got {self.drop_prob!r}")
    outages = tuple(tuple(o) if isinstance(o, (tuple, list)) else o for o in self.outages)
    for o in outages:
      if (not isinstance(o, tuple) or len(o) != 3
          or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in o)
          or not (0 <= o[0] < M and o[1] >= 1 and o[2] >= 1)):
        raise ValueError(f"diloco.outages entries must be (worker, step, duration) with "
                         f"0 <= worker < M={M}, step >= 1 and duration >= 1, got {o!r}")
    object.__setattr__(self, "outages", tuple(tuple(int(x) for x in o) for o in outages))
    checks.integer("seed", self.seed, 0)

  @property
  def active(self) -> bool:
    """Whether any sync can miss a worker."""
    return bool(self.drop_prob or self.outages)

  def down(self, t: int) -> np.ndarray:
    """bool [M]: the workers inside an outage at step t."""
    out = np.zeros(self.num_workers, bool)
    for w, s, d in self.outages:
      out[w] |= s <= t < s + d
    return out

  def mask(self, t: int, p: int) -> np.ndarray:
    """float32 [M]: 1 for the workers whose outer gradient of fragment p reaches the sync at
    step t, 0 for those dropped or down."""
    keep = ~self.down(t)
    if self.drop_prob:
      draw = np.random.default_rng([self.seed, t, p]).random(self.num_workers)
      keep &= draw >= self.drop_prob
    return keep.astype(np.float32)

  def rejoining(self, t: int) -> tuple[int, ...]:
    """The workers whose outage ends at step t: they restart from θ_g before inner step t."""
    return tuple(sorted({w for w, s, d in self.outages if s + d == t}))
