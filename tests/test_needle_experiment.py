"""experiments/needle.py's report from archived runs (the fresh-clone path): restored from
--archive into an empty --out, the table read from the runs' own JSON, missing runs named.

The script runs in a subprocess: it defines absl flags that reproduce.py (test_reproduce)
also defines, and one process cannot hold both.
"""

import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "needle.py")
ARCHIVED = os.path.join(REPO, "docs", "results", "runs", "needle")


def test_report_from_the_archive_names_the_missing_runs(tmp_path):
  arch = tmp_path / "archive"
  shutil.copytree(os.path.join(ARCHIVED, "streaming_short"), arch / "streaming_short")
  shutil.copytree(os.path.join(ARCHIVED, "streaming"), arch / "streaming")
  out, docs = tmp_path / "out", tmp_path / "docs"
  proc = subprocess.run([sys.executable, SCRIPT, "--report", f"--out={out}", f"--docs={docs}",
                         f"--archive={arch}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ["streaming", "streaming_short"]   # restored
  report = (docs / "needle.md").read_text()
  assert ("**Incomplete: no finished run of dp in this report** (`python experiments/needle.py "
          "--only=dp_short,dp` adds it).") in report
  # The recipe comes from the runs' own config.json, the numbers from their JSON files.
  short = json.loads((arch / "streaming_short" / "config.json").read_text())
  assert f"Stage `short`: {short['train']['num_steps']} steps on windows of " \
         f"{short['data']['seq_len']} bytes" in report
  summary = json.loads((arch / "streaming" / "summary.json").read_text())
  nd = json.loads((arch / "streaming" / "needle" / "needle.json").read_text())
  single = " · ".join(f"{p['length']}{'*' if p['extrapolation'] else ''}: {p['recall']:.2f}"
                      for p in nd["per_length"]["single"])
  assert f"| streaming | {summary['final_eval_loss']:.4f} | single | {single} |" in report
  assert "| dp |" not in report
  for png in ("needle_streaming_single.png", "needle_streaming_multikey.png",
              "needle_streaming_loss.png"):
    assert (docs / png).stat().st_size > 1000 and f"]({png})" in report


def test_report_with_no_evaluated_run_says_so_and_writes_nothing(tmp_path):
  # Only the short stage: nothing evaluated, so no report (and no claim of one).
  arch = tmp_path / "archive"
  shutil.copytree(os.path.join(ARCHIVED, "streaming_short"), arch / "streaming_short")
  out, docs = tmp_path / "out", tmp_path / "docs"
  proc = subprocess.run([sys.executable, SCRIPT, "--report", f"--out={out}", f"--docs={docs}",
                         f"--archive={arch}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert "no report written" in proc.stderr and "wrote" not in proc.stdout
  assert not (docs / "needle.md").exists()
