"""experiments/reproduce.py: suite grids, the smoke path end to end, resume, and CLI errors.

Runs on a small text file written here, so nothing needs ../shared.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from diloco_jax import config as config_lib, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "reproduce.py")


def _load():
  spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["reproduce"] = mod   # dataclasses look their module up while the class is built
  spec.loader.exec_module(mod)
  return mod


rp = _load()


@pytest.fixture(scope="module")
def text_glob(tmp_path_factory):
  # ~24 kB of varied English-like bytes: enough for train chunks and a 1 % held-out tail.
  words = ("the of and to in that was he it his with as had for not but at by on this be which "
           "from all were they she her one you so said there would their them we an been").split()
  out, state = [], 12345
  for _ in range(4800):
    state = (state * 1103515245 + 12345) % 2**31
    out.append(words[state % len(words)])
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text(" ".join(out) + ".\n", encoding="utf-8")
  return str(path)


def _tokens_per_step(run, scale):
  c = rp.make_config(run, scale, "unused")
  return c.train.batch_size * c.diloco.num_workers * c.data.seq_len


@pytest.mark.parametrize("scale", [rp.FULL, rp.SMOKE], ids=["full", "smoke"])
def test_suite_grids_and_equal_tokens(scale):
  main = rp.suite_cells("main", scale)
  grid = {(c.keys["method"], c.keys["H"], c.keys["M"]) for c in main}
  assert grid == {(m, h, M) for m in ("DP", "DiLoCo", "SD") for h in scale.main_H
                  for M in (2, 4)}
  assert len(main) == 12
  # DP does not depend on H: one run per M.
  assert len(rp.unique_runs(main, 1)) == 10
  assert {c.run.method for c in main if c.keys["method"] == "SD"} == {"streaming"}
  sd = [c.run for c in main if c.keys["method"] == "SD"]
  assert all(r.tau == 1 and r.codec == "fp4_e3m0" and r.pattern == "strided" for r in sd)

  overlap = rp.suite_cells("overlap", scale)
  assert sorted((c.keys["tau"], c.keys["alpha"]) for c in overlap) == sorted(
      (t, a) for t in (0, 1, 2, 5, 10) for a in (0.0, 0.5))
  codecs = rp.suite_cells("codecs", scale)
  assert {(c.keys["codec"], c.keys["error_feedback"]) for c in codecs} == {
      (k, ef) for k in ("fp32", "bf16", "fp8_e4m3", "fp4_e2m1", "fp4_e3m0")
      for ef in (False, True)}
  assert {c.keys["eval_params"] for c in rp.suite_cells("evaluated", scale)} == {
      "outer", "worker_mean", "worker0"}
  frags = rp.suite_cells("fragments", scale)
  assert {c.keys["pattern"] for c in frags} == {"strided", "sequential"}

  for suite in rp.SUITES:
    cells = rp.suite_cells(suite, scale)
    tokens = {c.run.T * _tokens_per_step(c.run, scale) for c in cells}
    assert len(tokens) == 1, (suite, tokens)   # equal tokens across every method of a suite


def test_full_scale_has_three_block_fragments():
  assert rp.FULL.num_layers >= 6 and rp.FULL.num_layers % 3 == 0
  assert 3 in rp.FULL.fragment_sizes and rp.FULL.blocks_per_fragment == 3
  assert rp.FULL.main_steps >= 6 * max(rp.FULL.main_H)   # several outer rounds at H=100
  assert max(rp.FULL.taus) < rp.FULL.ablation_H


def test_paper_outer_learning_rates():
  full = rp.FULL
  c = rp.make_config(rp.Run("streaming", M=2, H=30, T=10), full, "x")
  assert (c.diloco.outer_lr, c.diloco.outer_momentum, c.diloco.outer_optimizer) == (
      0.4, 0.9, "nesterov")
  c = rp.make_config(rp._diloco(2, 30, 10), full, "x")
  assert (c.algorithm, c.diloco.outer_lr) == ("diloco", 0.7)


def test_smoke_suite_end_to_end_and_resume(tmp_path, text_glob, monkeypatch):
  out, docs = str(tmp_path / "runs"), str(tmp_path / "docs")
  runs = rp.unique_runs(rp.suite_cells("fragments", rp.SMOKE), 1)
  assert len(runs) == 2   # smoke: 1 and 2 blocks per fragment (both patterns coincide)
  first = runs[0].name
  # Compiling dominates a smoke run, so train one of the suite's two runs for real.
  done = rp.run_suite("fragments", out, rp.SMOKE, text_glob, only=[first], log=lambda m: None)
  assert [(r.name, status) for r, status in done] == [(first, "ran")]
  assert os.path.exists(os.path.join(out, first, "summary.json"))

  files = rp.report(["fragments"], out, docs, seeds=1, log=lambda m: None, smoke=True)
  assert os.path.join(docs, "fragments.md") in files
  pngs = [f for f in files if f.endswith(".png")]
  assert pngs and all(os.path.getsize(f) > 1000 for f in pngs)
  table = open(os.path.join(docs, "fragments.md"), encoding="utf-8").read()
  assert "| pattern | blocks/fragment | eval loss |" in table
  # Both "strided 1" and "sequential 1" read the one finished run.
  assert "| strided | 1 |" in table and "| sequential | 1 |" in table

  # The CLI's --report mode rebuilds the docs from the workdirs without training.
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--suite=fragments", "--smoke", "--report", f"--out={out}",
       f"--docs={tmp_path / 'docs2'}"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert os.path.exists(tmp_path / "docs2" / "fragments_peak.png")

  # Resume: the finished run is skipped and untouched; only the unfinished one trains (a
  # stand-in trainer records the call instead of training, to keep the test fast).
  mtime = os.path.getmtime(os.path.join(out, first, "summary.json"))
  calls = []

  def fake_run(config, workdir):
    calls.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    return {"final_eval_loss": 0.0, "bits_sent_per_worker": 0}

  monkeypatch.setattr(train, "run", fake_run)
  again = rp.run_suite("fragments", out, rp.SMOKE, text_glob, log=lambda m: None)
  assert [(r.name, s) for r, s in again] == [(first, "skipped"), (runs[1].name, "ran")]
  assert calls == [runs[1].name]
  assert os.path.getmtime(os.path.join(out, first, "summary.json")) == mtime

  # The archive (diloco_jax/archive.py): a finished run is copied there, and a fresh --out (a
  # new clone) restores it instead of training it again; the stand-in run wrote no
  # summary.json, so it is neither archived nor skipped.
  arch, fresh = str(tmp_path / "archive"), str(tmp_path / "fresh")
  calls.clear()
  rp.run_suite("fragments", out, rp.SMOKE, text_glob, log=lambda m: None, archive=arch)
  assert os.listdir(arch) == [first]
  again = rp.run_suite("fragments", fresh, rp.SMOKE, text_glob, log=lambda m: None,
                       archive=arch)
  assert [(r.name, s) for r, s in again] == [(first, "skipped"), (runs[1].name, "ran")]
  assert calls == [runs[1].name, runs[1].name]
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--suite=fragments", "--smoke", "--report",
       f"--out={tmp_path / 'fresh2'}", f"--archive={arch}", f"--docs={tmp_path / 'docs3'}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "| strided | 1 |" in (tmp_path / "docs3" / "fragments.md").read_text()


def _fake_finished(root, run, loss, bits=10, dp_bits=100, peak=5):
  """A hand-written finished run: summary.json and one metrics row."""
  wd = root / run.name
  wd.mkdir()
  (wd / "summary.json").write_text(
      '{"final_eval_loss": %s, "bits_sent_per_worker": %s, "peak_bits_per_step": %s, '
      '"dp_bits_sent_per_worker": %s, "num_params": 7, "num_steps": 12}'
      % (loss, bits, peak, dp_bits))
  (wd / "metrics.jsonl").write_text('{"step": 12, "eval_loss": %s, "tokens_seen": 9}\n' % loss)


def test_seeds_give_mean_and_spread(tmp_path):
  # collect() on hand-written summaries: two seeds of one cell -> mean and sample std.
  cell = rp.suite_cells("evaluated", rp.SMOKE)[0]
  for seed, loss, bits, peak in ((0, 2.0, 10, 5), (1, 2.2, 30, 7)):   # bits vary with drops
    _fake_finished(tmp_path, dataclasses.replace(cell.run, seed=seed), loss, bits, peak=peak)
  rows = rp.collect("evaluated", str(tmp_path), rp.SMOKE, seeds=2)
  assert len(rows) == 1 and rows[0]["n"] == 2
  assert (rows[0]["bits"], rows[0]["peak"]) == (20.0, 7)   # bits: the seeds' mean; peak: max
  assert rows[0]["loss"] == pytest.approx(2.1)
  assert rows[0]["std"] == pytest.approx(0.1414213, rel=1e-5)
  assert rp._fmt_loss(rows[0]) == "2.1000 ± 0.1414"
  docs = tmp_path / "docs"
  docs.mkdir()
  rp.write_report("evaluated", rows, str(docs), 2, cells=3)   # 1 of 3 cells finished
  assert "**Incomplete: 1 of the suite's 3 cells have a finished run**" in (
      docs / "evaluated.md").read_text()
  rp.write_report("evaluated", rows, str(docs), 2, cells=1)
  assert "Incomplete" not in (docs / "evaluated.md").read_text()


def test_bad_suite_is_one_sentence_and_exit_2():
  proc = subprocess.run([sys.executable, SCRIPT, "--suite=bogus"], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "--suite must be one of" in lines[0] and "'bogus'" in lines[0]


def test_budget_takes_each_methods_best_sweep_lr_and_reports_the_targets(tmp_path):
  scale = rp.BUDGET
  assert scale.main_steps * scale.global_batch * scale.seq_len == pytest.approx(20 * 427_008,
                                                                              rel=1e-3)
  sweep = rp.suite_cells("sweep", scale)
  assert len(sweep) == 1 + 3 * len(rp.OUTER_LRS)
  assert {c.run.T for c in sweep} == {scale.ablation_steps}
  with pytest.raises(rp.SweepNotDone, match=r"run --suite=sweep first"):
    rp.budget_cells(scale, rp.best_outer_lrs(str(tmp_path), scale))
  best = {("DiLoCo", 30): 0.8, ("SD", 30): 0.6, ("SD", 100): 1.0}
  for c in sweep:   # the loss is lowest at the η in `best`
    k = (c.keys["method"], c.keys["H"])
    _fake_finished(tmp_path, c.run, 2.0 + (0 if k not in best else abs(c.keys["lr"] - best[k])))
  assert rp.best_outer_lrs(str(tmp_path), scale) == best
  cells = rp.budget_cells(scale, best)
  for c in cells:   # every run is a valid config, before anything trains
    config_lib.from_config_dict(rp.make_config(c.run, scale, "/dev/null"))
    if c.run.method != "dp":
      assert c.run.outer_lr == best["DiLoCo" if c.run.method == "diloco" else "SD", c.run.H]
  runs = rp.unique_runs(cells, 3)
  # M=2 × 3 seeds; M=4, the two delays and data-parallel and SD H=30 at 2× batch: one seed.
  assert len(runs) == 4 * 3 + 4 + 2 + 2
  assert {r.delay for r in runs} == {"none", "eager", "naive"}
  assert all(r.tau == 0 for r in runs if r.delay != "none")
  twice = [r for r in runs if r.batch]
  assert [(r.method, r.H, r.T, r.batch) for r in twice] == [
      ("dp", 1, 1042, 64), ("streaming", 30, 1042, 64)]
  assert (twice[0].name, twice[1].name[-13:]) == ("dp_M2_T1042_B64_s0", "_lr0.6_B64_s0")
  assert rp.make_config(twice[1], scale, "/dev/null").train.batch_size == 32   # per worker
  # The targets, from hand-written results: H=30 within 2 %, H=100 not, 500× fewer bits.
  results = tmp_path / "budget"
  results.mkdir()
  for r in runs:
    loss = {"dp": 2.0, "diloco": 2.1}.get(r.method, 2.03 if r.H == 30 else 2.06)
    if r.batch:   # at 2× batch: data-parallel 2.2, SD H=30 2.211 (+0.50 %)
      loss = 2.2 if r.method == "dp" else 2.211
    _fake_finished(results, r, loss + 0.01 * r.seed, bits=1 if r.H == 100 else 10, dp_bits=500)
  for c in sweep:
    _fake_finished(results, c.run, 2.0 + (0 if (c.keys["method"], c.keys["H"]) not in best
                                          else abs(c.keys["lr"] - best[c.keys["method"],
                                                                       c.keys["H"]])))
  files = rp.report(["sweep", "budget"], str(results), str(tmp_path / "docs"), seeds=3,
                    log=lambda m: None)
  text = open(tmp_path / "docs" / "budget.md", encoding="utf-8").read()
  # Means over three seeds (+0, +0.01, +0.02): SD 2.04 and 2.07 against DP 2.01.
  # Paired by seed: s0 2.03/2.00, s1 2.04/2.01, s2 2.05/2.02 → +1.500, +1.493, +1.485 %.
  assert ("H=30, M=2, within +2 % of data-parallel: met (+1.49 % of the means; paired by seed "
          "+1.49 % ± 0.01 (3 seeds))") in text
  assert ("H=100, M=2, within +2 % of data-parallel: **not met** (+2.99 % of the means; "
          "paired by seed +2.99 % ± 0.01 (3 seeds))") in text
  assert "| +1.49 % ± 0.01 (3 seeds) |" in text   # the table's column; "—" for DP itself
  assert "≥ 400× fewer bits than data-parallel: met (500×)" in text
  assert "2.0100 ± 0.0100" in text   # three seeds at M=2
  assert "seeds per cell: 1–3 (loss: mean ± sample std" in text   # M=2 three, M=4 one
  # The 2× batch rows compare with data-parallel at 2× batch, seed 0 against seed 0.
  assert ("Streaming DiLoCo H=30 over data-parallel, seed 0: +1.50 % at the budget's batch, "
          "+0.50 % at twice it.") in text
  assert "| Streaming DiLoCo, 2× batch, T/2 | 0.6 | 1 | 2.2110 |" in text
  assert text.count("| +0.50 % | +0.50 % |") == 1
  assert "| data-parallel, 2× batch, T/2 | — | 1 | 2.2000 |" in text   # its own "vs DP": +0.00
  assert "2× batch" not in text.split("## Where the gap is")[1].split("## At twice")[0]
  assert "**2.0000**" in open(tmp_path / "docs" / "sweep.md", encoding="utf-8").read()
  assert all(os.path.getsize(f) > 1000 for f in files if f.endswith(".png"))


def test_faults_suite_drops_outer_gradients_beside_clean_runs(text_glob):
  cells = rp.suite_cells("faults", rp.FULL)
  assert {(c.keys["method"], c.keys["drop"]) for c in cells} == {("DP", 0.0)} | {
      (m, d) for m in ("DiLoCo", "SD") for d in rp.DROP_PROBS}
  runs = rp.unique_runs(cells, 1)
  assert len({r.name for r in runs}) == len(runs) == 7
  # The clean runs are the main suite's (same names: they train once for both).
  main = {r.name for r in rp.unique_runs(rp.suite_cells("main", rp.FULL), 1)}
  assert {r.name for r in runs if not r.drop} <= main
  for r in runs:
    c = config_lib.from_config_dict(rp.make_config(r, rp.FULL, text_glob))
    assert c.diloco.drop_prob == r.drop and c.diloco.num_workers == 4
    assert ("_drop" in r.name) == bool(r.drop)


def test_paired_gap_uses_the_seeds_both_cells_finished():
  row = lambda method, seed_loss: dict(keys=dict(method=method, M=2), seed_loss=seed_loss)
  dp = row("DP", {0: 2.0, 1: 2.5, 2: 4.0})
  rows = [dp, row("SD", {0: 2.2, 1: 2.5}), row("SD", {2: 4.4}), row("SD", {3: 1.0})]
  assert rp._paired(rows, rows[1]) == "+5.00 % ± 7.07 (2 seeds)"   # +10 % and 0 %
  assert rp._paired(rows, rows[2]) == "+10.00 %"                    # one common seed
  assert rp._paired(rows, rows[3]) == "—"                           # none in common
  assert rp._paired(rows, dp) == "—"


def test_gap_over_training_pairs_seeds_per_evaluation_and_stretch():
  # Hand-made rows: evaluations at steps 10 and 20, training losses logged at 5, 10, 15, 20.
  def row(method, seed_losses, H=None):
    return dict(label={"DP": "data-parallel", "SD": "Streaming DiLoCo"}[method],
                keys=dict(method=method, H=H, M=2, delay="τ=1" if method == "SD" else ""),
                seed_evals={s: [(10, e[0]), (20, e[1])] for s, (e, _) in seed_losses.items()},
                seed_train={s: list(zip((5, 10, 15, 20), t)) for s, (_, t) in
                            seed_losses.items()})
  dp = row("DP", {0: ((2.0, 1.0), (3.0, 3.0, 2.0, 2.0)), 1: ((4.0, 2.0), (1.0, 1.0, 1.0, 1.0))})
  sd = row("SD", {0: ((2.2, 1.1), (3.3, 3.3, 2.0, 2.0)), 1: ((4.0, 2.04), (1.0, 1.2, 1.0, 1.0))},
           H=30)
  text = rp._gap_over_training([dp, sd])
  # held-out at 10: s0 +10 %, s1 0 % → +5.0; at 20: s0 +10 %, s1 +2 % → +6.0.
  # workers over (0, 10]: s0 6.6/6 → +10 %, s1 2.2/2 → +10 % → +10.0; over (10, 20]: 0 and 0.
  assert "| Streaming DiLoCo H=30 (2 seeds) | held-out | +5.0 | +6.0 |" in text
  assert "| Streaming DiLoCo H=30 (2 seeds) | workers | +10.0 | +0.0 |" in text
  assert "| method | loss | 10 | 20 |" in text
  assert rp._gap_over_training([sd]) == ""   # nothing to pair with
