"""diloco_jax/archive.py: finished runs' small files saved, restored into a fresh root, and the
continuations whose start is missing."""

import os
import subprocess

import pytest

from diloco_jax import archive


def _run(root, name, *, done=True, checkpoint=False, extra=()):
  wd = root / name
  (wd / "needle").mkdir(parents=True)
  (wd / "metrics.jsonl").write_text('{"step": 1}\n')
  (wd / "needle" / "needle.json").write_text('{"cells": []}')
  (wd / "stray.bin").write_bytes(b"x")   # not a result file: never archived
  if checkpoint:
    (wd / "checkpoints" / "300").mkdir(parents=True)
  if done:
    (wd / "summary.json").write_text('{"final_eval_loss": 1.5}')
  for rel in extra:
    (wd / rel).write_text("e")
  return str(wd)


def test_save_copies_only_result_files_of_a_finished_run(tmp_path):
  wd = _run(tmp_path / "out", "a", checkpoint=True)
  dest = tmp_path / "arch" / "a"
  assert archive.save(wd, str(dest)) == ["summary.json", "metrics.jsonl", "needle/needle.json"]
  assert sorted(os.listdir(dest)) == ["metrics.jsonl", "needle", "summary.json"]
  assert (dest / "needle" / "needle.json").read_text() == '{"cells": []}'
  # An unfinished run (no summary.json) is not archived: it must not look finished later.
  assert archive.save(_run(tmp_path / "out", "b", done=False), str(tmp_path / "arch" / "b")) == []
  assert not (tmp_path / "arch" / "b").exists()


def test_save_refuses_a_large_file(tmp_path, monkeypatch):
  wd = _run(tmp_path / "out", "a")
  monkeypatch.setattr(archive, "MAX_BYTES", 20)   # summary.json is 24 bytes, the rest less
  with pytest.raises(ValueError, match=r"summary.json is 24 bytes, more than the archive's 20"):
    archive.save(wd, str(tmp_path / "arch" / "a"))
  assert not (tmp_path / "arch").exists()   # nothing copied: all or nothing


def test_restore_fills_a_fresh_root_and_keeps_finished_runs(tmp_path):
  out, arch = tmp_path / "out", tmp_path / "arch"
  for name in ("a", "b", "c"):
    archive.save(_run(tmp_path / "first", name), str(arch / name))
  (arch / "partial").mkdir()   # no summary.json: not a finished run, not restored
  (out / "b").mkdir(parents=True)
  (out / "b" / "metrics.jsonl").write_text("interrupted")   # an interrupted run: replaced
  _run(out, "c", extra=("mine.txt",))                        # a finished run: kept as it is
  assert archive.restore(str(arch), str(out)) == ["a", "b"]
  assert (out / "a" / "summary.json").read_text() == '{"final_eval_loss": 1.5}'
  assert (out / "b" / "metrics.jsonl").read_text() == '{"step": 1}\n'
  assert (out / "c" / "mine.txt").exists() and not (out / "partial").exists()
  assert archive.restore(str(arch), str(out)) == []          # idempotent
  assert archive.restore(str(tmp_path / "none"), str(out)) == []


def test_parents_to_retrain_only_when_a_continuation_needs_the_checkpoint(tmp_path):
  out = tmp_path / "out"
  parents = {"s_short": None, "s": "s_short", "d_short": None, "d": "d_short",
             "e_short": None, "e": "e_short"}
  _run(out, "s_short")                      # restored: no checkpoint, continuation to run
  _run(out, "d_short")                      # restored, but its continuation is finished
  _run(out, "d")
  _run(out, "e_short", checkpoint=True)     # trained here: its checkpoint is there
  assert archive.has_checkpoints(str(out / "e_short"))
  assert not archive.has_checkpoints(str(out / "s_short"))
  assert archive.parents_to_retrain(str(out), parents, list(parents)) == ["s_short"]
  assert archive.parents_to_retrain(str(out), parents, ["s_short"]) == []   # "s" not asked for


def test_folder_flag(tmp_path):
  assert archive.folder(None, "docs/results", "runs/budget/") == os.path.join(
      "docs/results", "runs", "budget")
  assert archive.folder("", "docs/results", "runs/budget") == ""
  assert archive.folder("/x", "docs/results", "runs/budget") == "/x"


def test_the_default_archive_is_not_git_ignored():
  # The archive exists to be committed: a .gitignore rule for runs/ must not reach
  # docs/results/runs/ (it once did: `runs/` matches at any depth).
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(archive.folder(None, os.path.join(repo, "docs", "results"), "runs/budget"),
                      "run", "summary.json")
  try:
    proc = subprocess.run(["git", "-C", repo, "check-ignore", "-q", path], capture_output=True)
  except FileNotFoundError:
    pytest.skip("git is not installed")
  if proc.returncode == 128:
    pytest.skip("not a git checkout")
  assert proc.returncode == 1, f"{path} is git-ignored"
  proc = subprocess.run(["git", "-C", repo, "check-ignore", "-q", os.path.join(repo, "runs", "x")])
  assert proc.returncode == 0   # the workdirs themselves stay ignored
