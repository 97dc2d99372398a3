"""experiments/needle_seeds.py: the report from archived runs (restored into an empty --out,
every number read from the runs' own files, the per-η summary), the answer loss's first
crossing, and bad flags stopping before anything runs.

The script runs in a subprocess: it defines absl flags (--out, --docs, --archive, --report)
that the other experiment scripts also define, and one process cannot hold them twice.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "needle_seeds.py")


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=120, cwd=REPO)


def _fake_run(root, name, eta, seed, answer, single, multikey, held_out, wall_s, host=None):
  """A finished run's small files: answer losses logged every 50 steps from step 50."""
  wd = root / name
  (wd / "needle_short").mkdir(parents=True)
  (wd / "config.json").write_text(json.dumps({"seed": seed, "diloco": {"outer_lr": eta}}))
  summary = {"final_eval_loss": held_out, "wall_time_s": wall_s}
  if host:
    summary["host"] = host
  (wd / "summary.json").write_text(json.dumps(summary))
  rows = [{"step": 50 * (i + 1), "train_loss": 1.0, "ce_upweighted": a}
          for i, a in enumerate(answer)]
  rows.insert(2, {"step": 100, "eval_loss": 2.0})   # an eval row without the answer loss
  (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  per = {"single": [{"length": 256, "recall": single[0]}, {"length": 320, "recall": single[1]}],
         "multikey": [{"length": 256, "recall": multikey[0]},
                      {"length": 320, "recall": multikey[1]}]}
  (wd / "needle_short" / "needle.json").write_text(json.dumps({"per_length": per}))


def test_report_from_the_archive(tmp_path):
  arch = tmp_path / "archive"
  # η=0.4 seed 0: 3-log means 1.9, 1.4, 0.9 (below 1.0 at step 250), 0.47: never below 0.3.
  _fake_run(arch, "streaming_short_eta04_s0", 0.4, 0, [2.0, 1.9, 1.8, 0.5, 0.4, 0.5],
            (0.5, 0.25), (0.2, 0.1), 1.5, 600.0)
  # η=0.8 seed 0: means 0.9 (step 150), 0.5, 0.2 (step 250).
  _fake_run(arch, "streaming_short_eta08_s0", 0.8, 0, [1.2, 1.0, 0.5, 0.0, 0.1, 0.1],
            (1.0, 0.95), (0.7, 0.6), 1.25, 1200.0, {"cpu": "x", "vector_isa": "avx512f"})
  _fake_run(arch, "streaming_short_eta08_s1", 0.8, 1, [2.3, 2.3, 2.3, 2.3, 2.3, 2.3],
            (0.0, 0.05), (0.0, 0.0), 1.75, 900.0)
  out, docs = tmp_path / "out", tmp_path / "docs"
  proc = _run("--report", f"--out={out}", f"--docs={docs}", f"--archive={arch}")
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(out)) == ["streaming_short_eta04_s0", "streaming_short_eta08_s0",
                                     "streaming_short_eta08_s1"]   # restored
  report = (docs / "needle_seeds.md").read_text()
  # Answer loss of the last 5 logs: (1.9+1.8+0.5+0.4+0.5)/5 = 1.02; (1.0+0.5+0+0.1+0.1)/5 = 0.34.
  assert ("| streaming_short_eta04_s0 | 0.4 | 0 | 250 / – | 1.020 | 0.50 / 0.25 | 0.10 | "
          "1.5000 | 10.0 | – |") in report
  assert ("| streaming_short_eta08_s0 | 0.8 | 0 | 150 / 250 | 0.340 | 1.00 / 0.95 | 0.60 | "
          "1.2500 | 20.0 | avx512f |") in report
  assert ("| streaming_short_eta08_s1 | 0.8 | 1 | – / – | 2.300 | 0.00 / 0.05 | 0.00 | "
          "1.7500 | 15.0 | – |") in report
  # Per η: learnt to copy = single recall ≥ 0.9 at 320 bytes; means over the η's runs.
  assert "| 0.4 | 1 | 0 of 1 | 0.25 | 0.10 | 1.020 | 1.5000 |" in report
  assert "| 0.8 | 2 | 1 of 2 | 0.50 | 0.30 | 1.320 | 1.5000 |" in report


def test_the_committed_archive_rebuilds(tmp_path):
  # The fresh-clone path on the real archive: every committed run is read and named.
  arch = os.path.join(REPO, "docs", "results", "runs", "needle_seeds")
  proc = _run("--report", f"--out={tmp_path / 'out'}", f"--docs={tmp_path}",
              f"--archive={arch}")
  assert proc.returncode == 0, proc.stderr
  report = (tmp_path / "needle_seeds.md").read_text()
  for name in sorted(os.listdir(arch)):
    assert f"| {name} |" in report


def test_bad_flags_stop_before_anything_runs(tmp_path):
  out = tmp_path / "out"
  for flag, message in [("--outer_lrs=0.4,x", "--outer_lrs: 'x' is not a number"),
                        ("--outer_lrs=0", "--outer_lrs: η must be > 0, got 0"),
                        ("--seeds=1,-2", "--seeds: '-2' is not a non-negative integer")]:
    proc = _run(flag, f"--out={out}", "--archive=")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"needle_seeds: {message}"
    assert not out.exists()


def test_no_finished_run_writes_no_report(tmp_path):
  proc = _run("--report", f"--out={tmp_path / 'out'}", f"--docs={tmp_path}", "--archive=")
  assert proc.returncode == 1
  assert "no finished run" in proc.stderr
  assert not (tmp_path / "needle_seeds.md").exists()
