"""Run results that outlive their workdir: a finished run's small files copied into a folder
that is committed with the code, and copied back into an empty workdir root before a suite
resumes.

A workdir holds checkpoints (large, git-ignored under runs/), but a suite's reports and its
skip-if-finished logic only read a few small files. A suite that spans several sessions on
fresh clones (the budget suite is about 12 hours of 2 cores and needs the sweep's results)
would otherwise train again what an earlier session finished. `save` copies
those files into ``ARCHIVE/<run>/``; `restore` puts them back into ``OUT/<run>/`` for every
archived run that OUT lacks. A restored run has no checkpoints: it counts as finished, but
nothing can continue from it (`has_checkpoints`).
"""

from __future__ import annotations

import os
import shutil

# Relative paths copied when present: the trainer's summary, config and metric rows, the
# suites' own records, and the long-context evaluations' JSON and plots.
FILES = ("summary.json", "config.json", "metrics.jsonl", "reproduce.json",
         "needle/needle.json", "ppl/perplexity.json")
PLOTS = ("needle/needle_single.png", "needle/needle_multikey.png",
         "needle/needle_multivalue.png", "needle/needle_multiquery.png", "ppl/perplexity.png")
MAX_BYTES = 2 * 2**20   # a larger file is a mistake (a checkpoint, a dump), not a result


def save(workdir: str, dest: str, files=FILES + PLOTS) -> list[str]:
  """Copies `workdir`'s finished-run files (those of `files` that exist) into `dest`.

  Returns the relative paths copied. A run without summary.json is not finished: nothing is
  copied (a half-written run must not look finished after `restore`).
  """
  if not finished(workdir):
    return []
  copied = [rel for rel in files if os.path.isfile(os.path.join(workdir, rel))]
  for rel in copied:   # every size checked before the first copy: all or nothing
    size = os.path.getsize(os.path.join(workdir, rel))
    if size > MAX_BYTES:
      raise ValueError(f"{os.path.join(workdir, rel)} is {size} bytes, more than the "
                       f"archive's {MAX_BYTES}; only small result files belong in {dest}")
  for rel in copied:
    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
    shutil.copyfile(os.path.join(workdir, rel), os.path.join(dest, rel))
  return copied


def restore(archive: str, out: str) -> list[str]:
  """Copies every archived run (a folder of `archive` with summary.json) that `out` has no
  finished run of into ``out/<run>/``; returns the names restored, sorted.

  A run directory in `out` without summary.json (an interrupted run) is replaced: the archived
  run is finished, the interrupted one is not.
  """
  if not os.path.isdir(archive):
    return []
  restored = []
  for name in sorted(os.listdir(archive)):
    src = os.path.join(archive, name)
    wd = os.path.join(out, name)
    if not finished(src) or finished(wd):
      continue
    if os.path.isdir(wd):
      shutil.rmtree(wd)
    shutil.copytree(src, wd)
    restored.append(name)
  return restored


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` has a checkpoint a continuation (``train.init_from``) can start from."""
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt))


def folder(flag: str | None, docs: str, out: str) -> str:
  """The experiments' --archive flag: None means DOCS/runs/<basename of OUT> (runs/budget
  archives into docs/results/runs/budget), '' means no archive, anything else is the folder."""
  if flag is not None:
    return flag
  return os.path.join(docs, "runs", os.path.basename(os.path.normpath(out)))


def finished(workdir: str) -> bool:
  """Whether `workdir` holds a finished run (the trainer writes summary.json last)."""
  return os.path.exists(os.path.join(workdir, "summary.json"))


def parents_to_retrain(out: str, parents: dict[str, str | None], todo) -> list[str]:
  """The finished runs of `out` that must train again because a continuation still to run
  (in `todo`, not finished; `parents[name]` is the run it continues) starts from their
  checkpoint and they have none (restored from an archive)."""
  again = []
  for n in todo:
    p = parents.get(n)
    if (p and p not in again and not finished(os.path.join(out, n))
        and finished(os.path.join(out, p)) and not has_checkpoints(os.path.join(out, p))):
      again.append(p)
  return again
