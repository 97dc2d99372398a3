"""Metrics: a console progress line, WORKDIR/metrics.jsonl and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return None   # JSON has no NaN/inf: a diverged value is written as null
  return v


class MetricsWriter:
  """One JSON object per logged step in metrics.jsonl (appended, so a resumed run continues the
  file) and the scalar values as TensorBoard events in WORKDIR/tb."""

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    _truncate_after(self.path, resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional at library level
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, values: dict) -> None:
    row = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Drops rows logged after `step` (steps an interrupted run did past its last checkpoint; the
  resumed run logs them again)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]
  keep = [line for line in rows if json.loads(line)["step"] <= step]
  if len(keep) != len(rows):
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(keep)


class Progress:
  """`step 120/300 | loss 3.412 | eval 3.398 | 41.2k tok/s | ETA 0:00:12` on stderr."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stderr, prefix: str = ""):
    self.total = total_steps
    self.prefix = prefix   # e.g. "[process 1] " when every process prints its own line
    self.start_step = start_step
    self.t0 = time.perf_counter()
    self.stream = stream

  def line(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None = None,
           extras: dict | None = None):
    elapsed = time.perf_counter() - self.t0
    done = max(step - self.start_step, 1)
    eta = elapsed / done * (self.total - step)
    parts = [f"step {step}/{self.total}", f"loss {loss:.4f}"]
    if eval_loss is not None:
      parts.append(f"eval {eval_loss:.4f}")
    parts += [f"{k} {v}" for k, v in (extras or {}).items()]
    parts += [f"{tokens_per_s / 1e3:.1f}k tok/s", f"ETA {_hms(eta)}"]
    print(self.prefix + " | ".join(parts), file=self.stream, flush=True)


def _hms(seconds: float) -> str:
  s = int(max(seconds, 0))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
