"""Reproduce the shape of the Streaming DiLoCo paper's findings at CPU scale, and report them.

Five suites (SPEC §2-4), each a grid of runs with equal tokens across its methods:

  main       data-parallel vs DiLoCo vs Streaming DiLoCo (τ=1, E3M0) at H ∈ {30, 100}, M ∈ {2, 4}
  overlap    Streaming DiLoCo, τ ∈ {0, 1, 2, 5, 10} × α ∈ {0, 0.5}
  codecs     fp32, bf16, fp8_e4m3, fp4_e2m1, fp4_e3m0, each without and with error feedback
  fragments  strided vs sequential, 1, 2, 3 or 6 blocks per fragment
  evaluated  which parameters are evaluated: outer copy θ_g, worker mean, worker 0
  all        the five, in that order

and the paper's headline at a compute-optimal budget (issue 12; the BUDGET scale: the same
6-block model, ≈ 20 bytes per parameter, 4,096 bytes per step):

  sweep      outer learning rate η ∈ {0.4, 0.6, 0.8, 1.0} for DiLoCo H=30 and Streaming DiLoCo
             H=30 and H=100 (M=2, one seed, a quarter of the budget), data-parallel beside them
  budget     at the whole budget with each method's best η from the sweep: data-parallel,
             DiLoCo H=30, Streaming DiLoCo H=30 and H=100 at M=2 (--seeds=3 for mean ± std),
             the same at M=4 (seed 0), and Streaming DiLoCo H=30 with eager updates and with
             the naive one-round delay beside its τ=1 run; checks the targets (within +2 % of
             data-parallel at H=30 and H=100, ≥ 400× fewer bits at H=100). Needs the sweep.

and one at the main suite's scale (issue 13):

  faults     outer gradients dropped at random (diloco.drop_prob ∈ {0, 0.25, 0.5}, each worker
             each sync) for DiLoCo and Streaming DiLoCo, M=4, H=30, data-parallel beside them:
             the DiLoCo paper's ablation (50 % dropped cost it ≈ 2 % perplexity)

Every run trains the same 6-block byte-level model on text files (default: the english-pd corpus)
in its own workdir under --out, named after its settings; a run whose summary.json exists is
skipped, so an interrupted suite resumes where it stopped and runs shared between suites (the
Streaming DiLoCo default appears in four of them) train once. A name encodes the run's
algorithm settings, not the scale or the data: use one --out per --data, --steps or --smoke.
After the runs, the report (tables in markdown and PNG plots) goes to --docs; `--report` only
rebuilds it from the workdirs. Each finished run's small files (summary, config, metrics) are
also copied to --archive (default docs/results/runs/<basename of --out>, committed with the
code) and restored from there into an empty --out, so a suite resumes, and a report rebuilds,
on a fresh clone (`diloco_jax/archive.py`).

  python experiments/reproduce.py --suite=main --out=runs/reproduce
  python experiments/reproduce.py --suite=all --out=runs/reproduce --seeds=2
  python experiments/reproduce.py --report --out=runs/reproduce       # tables and plots only
  python experiments/reproduce.py --suite=evaluated --smoke --out=runs/smoke --docs=runs/smoke/docs

Measured times (2 shared CPU cores) are in docs/results/README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import sys
import time

from absl import app, flags

from diloco_jax import archive as archive_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = ("main", "overlap", "codecs", "fragments", "evaluated")
BUDGET_SUITES = ("sweep", "budget")   # at the BUDGET scale; not part of "all"
EXTRA_SUITES = ("faults",)            # at the FULL scale; not part of "all"
ALL_SUITES = SUITES + BUDGET_SUITES + EXTRA_SUITES
DROP_PROBS = (0.0, 0.25, 0.5)         # the faults suite's drop probabilities
OUTER_LRS = (0.4, 0.6, 0.8, 1.0)     # the sweep's η grid

_SUITE = flags.DEFINE_string("suite", "main", f"one of {', '.join(ALL_SUITES)} "
                             f"or all (the first five)")
_OUT = flags.DEFINE_string("out", "runs/reproduce", "root of the run workdirs")
_DOCS = flags.DEFINE_string("docs", os.path.join(REPO, "docs", "results"),
                            "where the markdown tables and PNG plots go")
_DATA = flags.DEFINE_string("data", os.path.join(REPO, "..", "shared", "data", "english-pd",
                                                 "*.txt"), "text files (glob) to train on")
_SEEDS = flags.DEFINE_integer("seeds", 1, "seeds per run (0 .. N-1); tables show mean and spread")
_STEPS = flags.DEFINE_integer("steps", 0, "inner steps T of the main suite; 0: the scale's "
                              "(the ablation suites use 2/5 of it)")
_SMOKE = flags.DEFINE_bool("smoke", False,
                           "a seconds-long version (2 blocks, few steps), for tests")
_REPORT = flags.DEFINE_bool("report", False, "only rebuild tables and plots from --out")
_ARCHIVE = flags.DEFINE_string(
    "archive", None, "folder of finished runs' small files, committed with the code "
    "(diloco_jax/archive.py): restored into --out before the suite, each finished run copied "
    "there; default DOCS/runs/<basename of --out>; '' for none")
_ONLY = flags.DEFINE_list("only", [], "run only the runs with these names (timing probes)")


# ------------------------------------------------------------------------------------ scale
@dataclasses.dataclass(frozen=True)
class Scale:
  """The sizes that make a suite fit its time budget. Tokens per step are global_batch · seq_len
  for every M: each worker gets global_batch / M sequences, so M=2 and M=4 see equal tokens in
  the same number of steps (and H means the same thing for both)."""

  num_layers: int       # transformer blocks (6: 3-block fragments exist, as in the paper)
  tied_embeddings: bool  # False: a separate unembedding (see FULL)
  seq_len: int          # L, bytes per sequence
  global_batch: int     # sequences per step summed over workers
  main_steps: int       # T of the main suite (H=100 needs several rounds: T/H outer steps)
  main_H: tuple[int, ...]
  ablation_steps: int   # T of overlap / codecs / fragments / evaluated
  ablation_H: int
  learning_rate: float  # peak inner AdamW learning rate
  warmup: int           # inner warm-up steps
  eval_points: int      # evaluations per run (loss curves)
  eval_batches: int     # held-out batches per evaluation
  eval_batch_size: int  # sequences per held-out batch
  blocks_per_fragment: int
  fragment_sizes: tuple[int, ...]
  taus: tuple[int, ...]
  checkpoint_every: int = 0   # 0: only at the end; long runs resume mid-way from these


# Sized for 2 CPU cores shared with other work: main ≈ 40 min, the four ablation suites ≈ 60 min
# (seeds=1). Untied embeddings: with tied ones this model sits on the unigram plateau (≈3.1
# nats/byte) for ~200 of its 600 steps (DiLoCo for ~400), which leaves the short ablation runs
# nothing to compare; untied, data-parallel is at 2.78 after 75 steps.
FULL = Scale(num_layers=6, tied_embeddings=False, seq_len=64, global_batch=16, main_steps=600,
             main_H=(30, 100), ablation_steps=240, ablation_H=30, learning_rate=3e-3, warmup=30,
             eval_points=12, eval_batches=4, eval_batch_size=32, blocks_per_fragment=3,
             fragment_sizes=(1, 2, 3, 6), taus=(0, 1, 2, 5, 10))
# The compute-optimal budget (issue 12): FULL's model, 20 bytes per parameter = 8.54M bytes in
# T = 2,085 steps of 32 × 128 bytes (H=100 gives 20 outer rounds); the sweep runs a quarter of
# it. A larger step than FULL's: the same bytes in 4× fewer host round trips.
BUDGET = dataclasses.replace(FULL, seq_len=128, global_batch=32, main_steps=2085,
                             ablation_steps=521, warmup=100, eval_points=10,
                             checkpoint_every=250)
# Same structure, tiny sizes: 2 blocks (so 1-block fragments), H small but > max τ.
SMOKE = Scale(num_layers=2, tied_embeddings=False, seq_len=16, global_batch=4, main_steps=8,
              main_H=(2, 4), ablation_steps=12, ablation_H=11, learning_rate=1e-2, warmup=2,
              eval_points=2, eval_batches=1, eval_batch_size=4, blocks_per_fragment=2,
              fragment_sizes=(1, 2), taus=(0, 1, 2, 5, 10))
SMOKE_BUDGET = dataclasses.replace(SMOKE, main_steps=12, ablation_steps=8, checkpoint_every=4)


def scale_for(suite: str, smoke: bool) -> Scale:
  if suite in BUDGET_SUITES:
    return SMOKE_BUDGET if smoke else BUDGET
  return SMOKE if smoke else FULL


# ------------------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a method and its settings. Fields not used by a method keep defaults so
  that equal settings give equal names (and share a workdir)."""

  method: str                 # "dp", "diloco", "streaming"
  M: int = 2
  H: int = 30
  T: int = 300
  tau: int = 1
  alpha: float = 0.5
  codec: str = "fp4_e3m0"
  error_feedback: bool = False
  blocks: int = 3             # blocks per fragment
  pattern: str = "strided"
  eval_params: str = "outer"
  outer_lr: float = 0.0       # η; 0: the paper's (0.4 Streaming DiLoCo, 0.7 DiLoCo)
  delay: str = "none"         # "naive" / "eager": the all-reduce overlaps a whole round (τ=0)
  drop: float = 0.0           # diloco.drop_prob: each worker's outer gradient lost per sync
  batch: int = 0              # sequences per step summed over workers (0: the scale's)
  seed: int = 0

  @property
  def name(self) -> str:
    base = f"{self.method}_M{self.M}_T{self.T}"
    batch = f"_B{self.batch}" if self.batch else ""
    if self.method == "dp":
      return f"{base}{batch}_s{self.seed}"
    base += f"_H{self.H}"
    if self.method == "streaming":
      base += (f"_tau{self.tau}_a{self.alpha:g}_{self.codec}{'_ef' if self.error_feedback else ''}"
               f"_{self.pattern}{self.blocks}")
    if self.eval_params != "outer":
      base += f"_{self.eval_params}"
    if self.outer_lr:
      base += f"_lr{self.outer_lr:g}"
    if self.delay != "none":
      base += f"_{self.delay}"
    if self.drop:
      base += f"_drop{self.drop:g}"
    return f"{base}{batch}_s{self.seed}"


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row of a suite's table: a label, the run (seed 0) and the table's columns."""

  label: str
  run: Run
  keys: dict
  seeds: int = 0   # at most this many seeds of this cell (0: every seed asked for)


def _dp(M, T):
  return Run("dp", M=M, H=1, T=T, tau=0, alpha=0.0, codec="fp32", blocks=0, pattern="")


def _diloco(M, H, T):
  return Run("diloco", M=M, H=H, T=T, tau=0, alpha=0.0, codec="fp32", blocks=0, pattern="")


def suite_cells(suite: str, scale: Scale, steps: int = 0) -> list[Cell]:
  """The grid of a suite. Every cell of a suite has the same T and tokens per step (the budget
  suite adds two at twice the batch in T/2, `budget_cells`)."""
  T_main = steps or scale.main_steps
  T = max(steps * 2 // 5, 1) if steps else scale.ablation_steps
  H, k = scale.ablation_H, scale.blocks_per_fragment
  sd = functools.partial(Run, "streaming", M=2, H=H, T=T, blocks=k)
  if suite == "main":
    cells = []
    for M in (2, 4):
      for h in scale.main_H:
        cells.append(Cell("data-parallel", _dp(M, T_main), dict(method="DP", H=h, M=M)))
        cells.append(Cell("DiLoCo", _diloco(M, h, T_main), dict(method="DiLoCo", H=h, M=M)))
        cells.append(Cell("Streaming DiLoCo", Run("streaming", M=M, H=h, T=T_main, blocks=k),
                          dict(method="SD", H=h, M=M)))
    return cells
  if suite == "overlap":
    return [Cell(f"τ={tau} α={a:g}", sd(tau=tau, alpha=a), dict(tau=tau, alpha=a))
            for a in (0.0, 0.5) for tau in scale.taus]
  if suite == "codecs":
    cells = []
    for codec in ("fp32", "bf16", "fp8_e4m3", "fp4_e2m1", "fp4_e3m0"):
      for ef in (False, True):
        # fp32 with error feedback is fp32 without it (the residual Δ + r − Q(Δ + r) is 0), so
        # both cells read the same run.
        run = sd(codec=codec, error_feedback=ef and codec != "fp32")
        cells.append(Cell(f"{codec}{' +EF' if ef else ''}", run,
                          dict(codec=codec, error_feedback=ef)))
    return cells
  if suite == "fragments":
    # With 1 block per fragment, or all blocks in one, both patterns make the same fragments:
    # those cells share the strided run.
    same = (1, scale.num_layers)
    return [Cell(f"{p} {b}", sd(blocks=b, pattern="strided" if b in same else p),
                 dict(pattern=p, blocks=b))
            for p in ("strided", "sequential") for b in scale.fragment_sizes]
  if suite == "evaluated":
    return [Cell(e, sd(eval_params=e), dict(eval_params=e))
            for e in ("outer", "worker_mean", "worker0")]
  if suite == "sweep":
    T, k = scale.ablation_steps, scale.blocks_per_fragment
    cells = [Cell("data-parallel", _dp(2, T), dict(method="DP", H=0, M=2, lr=0.0))]
    for lr in OUTER_LRS:
      cells.append(Cell("DiLoCo", dataclasses.replace(_diloco(2, 30, T), outer_lr=lr),
                        dict(method="DiLoCo", H=30, M=2, lr=lr)))
      for h in scale.main_H:
        cells.append(Cell("Streaming DiLoCo", Run("streaming", M=2, H=h, T=T, blocks=k,
                                                  outer_lr=lr),
                          dict(method="SD", H=h, M=2, lr=lr)))
    return cells
  if suite == "faults":
    T, M = T_main, 4
    cells = [Cell("data-parallel", _dp(M, T), dict(method="DP", M=M, drop=0.0))]
    for drop in DROP_PROBS:
      cells.append(Cell("DiLoCo", dataclasses.replace(_diloco(M, H, T), drop=drop),
                        dict(method="DiLoCo", M=M, drop=drop)))
      cells.append(Cell("Streaming DiLoCo", Run("streaming", M=M, H=H, T=T, blocks=k, drop=drop),
                        dict(method="SD", M=M, drop=drop)))
    return cells
  raise ValueError(f"--suite must be one of {', '.join(ALL_SUITES)} or all, got "
                   f"{suite!r}")


def budget_cells(scale: Scale, best_lr: dict) -> list[Cell]:
  """The budget suite's grid, with best_lr {(method, H): η} from the sweep (`best_outer_lrs`)."""
  T, k, H_lo, H_hi = scale.main_steps, scale.blocks_per_fragment, *scale.main_H

  def methods(M):
    return [("data-parallel", _dp(M, T), dict(method="DP", H=0)),
            ("DiLoCo", dataclasses.replace(_diloco(M, H_lo, T), outer_lr=best_lr["DiLoCo", H_lo]),
             dict(method="DiLoCo", H=H_lo)),
            *[("Streaming DiLoCo", Run("streaming", M=M, H=h, T=T, blocks=k,
                                       outer_lr=best_lr["SD", h]), dict(method="SD", H=h))
              for h in (H_lo, H_hi)]]
  cells = [Cell(label, run, dict(keys, M=M, delay="τ=1" if keys["method"] == "SD" else ""),
                seeds=0 if M == 2 else 1)
           for M in (2, 4) for label, run, keys in methods(M)]
  sd = Run("streaming", M=2, H=H_lo, T=T, tau=0, blocks=k, outer_lr=best_lr["SD", H_lo])
  for delay in ("eager", "naive"):
    cells.append(Cell(f"Streaming DiLoCo, {delay}", dataclasses.replace(sd, delay=delay),
                      dict(method="SD", H=H_lo, M=2, delay=delay), seeds=1))
  # Where the gap is: the same bytes at twice the batch in half the steps (seed 0), each worker
  # at the batch data-parallel averages at the budget's. If the gap is the workers' progress
  # per step on half data-parallel's batch (`_gap_over_training`), it shrinks here.
  B2, T2 = 2 * scale.global_batch, T // 2
  dp2, _, sd2, _ = methods(2)   # data-parallel and Streaming DiLoCo H=H_lo
  for label, run, keys in (dp2, sd2):
    cells.append(Cell(f"{label}, 2× batch, T/2", dataclasses.replace(run, T=T2, batch=B2),
                      dict(keys, M=2, delay="τ=1" if keys["method"] == "SD" else "", batch=B2),
                      seeds=1))
  return cells


class SweepNotDone(Exception):
  """The budget suite needs every sweep run finished (its best η)."""


def best_outer_lrs(out: str, scale: Scale) -> dict:
  """{(method, H): the sweep's η with the lowest final eval loss} for DiLoCo and SD."""
  best, missing = {}, []
  for cell in suite_cells("sweep", scale):
    if cell.keys["method"] == "DP":
      continue
    got = _load(out, cell.run)
    if got is None:
      missing.append(cell.run.name)
      continue
    key = (cell.keys["method"], cell.keys["H"])
    loss = got["summary"]["final_eval_loss"]
    if key not in best or loss < best[key][1]:
      best[key] = (cell.keys["lr"], loss)
  if missing:
    raise SweepNotDone(f"the budget suite takes each method's η from the sweep, and {len(missing)} "
                       f"sweep runs are not finished under {out!r} (e.g. {missing[0]}); run "
                       f"--suite=sweep first")
  return {k: lr for k, (lr, _) in best.items()}


def cells_for(suite: str, scale: Scale, steps: int = 0, out: str = "") -> list[Cell]:
  return (budget_cells(scale, best_outer_lrs(out, scale)) if suite == "budget"
          else suite_cells(suite, scale, steps))


def unique_runs(cells: list[Cell], seeds: int) -> list[Run]:
  """The distinct runs behind a suite's cells (DP does not depend on H; fp32 with error feedback
  is fp32 without it), each for seeds 0 .. seeds-1 (at most the cell's own `seeds`)."""
  out = []
  for cell in cells:
    for s in range(min(seeds, cell.seeds) if cell.seeds else seeds):
      r = dataclasses.replace(cell.run, seed=s)
      if r not in out:
        out.append(r)
  return out


# ------------------------------------------------------------------------------------ config
def _base_family():
  path = os.path.join(REPO, "experiments", "configs", "streaming.py")
  spec = importlib.util.spec_from_file_location("streaming_family", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_config(run: Run, scale: Scale, data_glob: str):
  """The ConfigDict of a run: the streaming tiny family, resized by `scale`."""
  c = _base_family().get_config("tiny")
  c.algorithm = run.method
  c.seed = run.seed
  c.model.num_layers = scale.num_layers
  c.model.tied_embeddings = scale.tied_embeddings
  c.diloco.num_workers = run.M
  c.diloco.inner_steps = max(run.H, 1)
  # Paper values unless the run says: Streaming DiLoCo η=0.4, DiLoCo η=0.7, Nesterov, μ=0.9.
  c.diloco.outer_lr = run.outer_lr or (0.4 if run.method == "streaming" else 0.7)
  c.diloco.outer_momentum = 0.9
  c.diloco.layers_per_fragment = max(run.blocks, 1)
  c.diloco.fragment_pattern = run.pattern or "strided"
  c.diloco.overlap_steps = run.tau
  c.diloco.merge_alpha = run.alpha
  c.diloco.codec = run.codec
  c.diloco.error_feedback = run.error_feedback
  c.diloco.eager = run.delay == "eager"
  c.diloco.delayed = run.delay == "naive"
  c.diloco.drop_prob = run.drop
  c.train.num_steps = run.T
  c.train.batch_size = (run.batch or scale.global_batch) // run.M
  c.train.learning_rate = scale.learning_rate
  c.train.warmup_steps = scale.warmup
  c.train.log_every = max(run.T // (4 * scale.eval_points), 1)
  c.data.source = "text"
  c.data.paths = (data_glob,)
  c.data.seq_len = scale.seq_len
  c.eval.every_steps = max(run.T // scale.eval_points, 1)
  c.eval.params = run.eval_params
  c.eval.num_batches = scale.eval_batches
  c.eval.batch_size = scale.eval_batch_size
  c.checkpoint.every_steps = scale.checkpoint_every   # 0: only at the end (short runs)
  return c


def run_suite(suite: str, out: str, scale: Scale, data_glob: str, seeds: int = 1, steps: int = 0,
              only=(), log=print, archive: str = "") -> list[tuple[Run, str]]:
  """Trains every run of the suite not finished yet; returns (run, "ran" | "skipped").

  With `archive` (a folder committed with the code, `diloco_jax.archive`), the archived runs
  count as finished (restored into `out` first) and every finished run's small files are
  copied there, so a suite resumes on a fresh clone.
  """
  from diloco_jax import config as config_lib, train  # noqa: PLC0415  (after the CLI set devices)
  done = []
  if archive:
    archive_lib.restore(archive, out)
  runs = unique_runs(cells_for(suite, scale, steps, out), seeds)
  for r in runs:   # every run's config error before the first run trains
    if not only or r.name in only:
      config_lib.from_config_dict(make_config(r, scale, data_glob))
  for i, r in enumerate(runs):
    if only and r.name not in only:
      continue
    workdir = os.path.join(out, r.name)
    if archive_lib.finished(workdir):
      log(f"[{suite} {i + 1}/{len(runs)}] {r.name}: done, skipped")
      done.append((r, "skipped"))
      if archive:
        archive_lib.save(workdir, os.path.join(archive, r.name))
      continue
    t0 = time.perf_counter()
    s = train.run(make_config(r, scale, data_glob), workdir)
    elapsed = time.perf_counter() - t0
    with open(os.path.join(workdir, "reproduce.json"), "w", encoding="utf-8") as f:
      json.dump({"run": dataclasses.asdict(r), "elapsed_s": elapsed}, f, indent=2)
    if archive:
      archive_lib.save(workdir, os.path.join(archive, r.name))
    log(f"[{suite} {i + 1}/{len(runs)}] {r.name}: eval loss {s['final_eval_loss']:.4f}, "
        f"{s['bits_sent_per_worker']:.3g} bits/worker, {elapsed:.0f} s")
    done.append((r, "ran"))
  return done


# ------------------------------------------------------------------------------------ report
def _load(out: str, run: Run):
  wd = os.path.join(out, run.name)
  try:
    with open(os.path.join(wd, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
  except FileNotFoundError:
    return None
  curve, evals, train = [], [], []
  with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "eval_loss" in row:
        curve.append((row["tokens_seen"], row["eval_loss"]))
        evals.append((row["step"], row["eval_loss"]))
      if "train_loss" in row:
        train.append((row["step"], row["train_loss"]))
  elapsed = None
  if os.path.exists(os.path.join(wd, "reproduce.json")):
    with open(os.path.join(wd, "reproduce.json"), encoding="utf-8") as f:
      elapsed = json.load(f)["elapsed_s"]
  return dict(summary=summary, curve=curve, evals=evals, train=train, elapsed=elapsed)


def _stats(values):
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std


def collect(suite: str, out: str, scale: Scale, seeds: int, steps: int = 0) -> list[dict]:
  """One dict per cell with the seeds that finished: loss mean/std, bits (the mean over the
  seeds: with dropped workers they depend on the seed), peak bits (the largest), curve (seed 0)."""
  rows = []
  for cell in cells_for(suite, scale, steps, out):
    n = min(seeds, cell.seeds) if cell.seeds else seeds
    by_seed = {s: _load(out, dataclasses.replace(cell.run, seed=s)) for s in range(n)}
    by_seed = {s: g for s, g in by_seed.items() if g is not None}
    got = list(by_seed.values())
    if not got:
      continue
    s0 = got[0]["summary"]
    mean, std = _stats([g["summary"]["final_eval_loss"] for g in got])
    rows.append(dict(label=cell.label, keys=cell.keys, run=cell.run, n=len(got), loss=mean,
                     std=std,
                     seed_loss={s: g["summary"]["final_eval_loss"] for s, g in by_seed.items()},
                     bits=_stats([g["summary"]["bits_sent_per_worker"] for g in got])[0],
                     peak=max(g["summary"]["peak_bits_per_step"] for g in got),
                     dp_bits=s0["dp_bits_sent_per_worker"], params=s0["num_params"],
                     tokens=s0["num_steps"] * (cell.run.batch or scale.global_batch)
                     * scale.seq_len,
                     curve=got[0]["curve"],
                     seed_evals={s: g["evals"] for s, g in by_seed.items()},
                     seed_train={s: g["train"] for s, g in by_seed.items()},
                     elapsed=sum(g["elapsed"] or 0.0 for g in got)))
  return rows


def _fmt_loss(r):
  return f"{r['loss']:.4f}" + (f" ± {r['std']:.4f}" if r["n"] > 1 else "")


def _table(rows, columns) -> str:
  head = "| " + " | ".join(c for c, _ in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  body = ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in rows]
  return "\n".join([head, sep, *body])


_COMMON = [("eval loss", _fmt_loss), ("bits/worker", lambda r: f"{r['bits']:.3g}"),
           ("peak bits/step", lambda r: f"{r['peak']:.3g}"),
           ("DP bits ÷ bits", lambda r: f"{r['dp_bits'] / r['bits']:.1f}" if r["bits"] else "—")]


def _dp_beside(rows, r):
  """The data-parallel rows r compares with: the same M and the same batch."""
  return [x for x in rows if x["keys"]["method"] == "DP" and x["keys"]["M"] == r["keys"]["M"]
          and x["keys"].get("batch") == r["keys"].get("batch")]


def _rel(rows, r):
  """Loss relative to data-parallel at the same M (the paper's comparison)."""
  dp = _dp_beside(rows, r)
  return f"{100 * (r['loss'] / dp[0]['loss'] - 1):+.2f} %" if dp else "—"


def _paired(rows, r):
  """The loss relative to data-parallel at the same M seed by seed (a seed fixes the init and
  the data order for every method, so the seeds' common part cancels), over the seeds both
  finished: mean ± sample std of the per-seed gaps, in %."""
  dp = _dp_beside(rows, r)
  if not dp or r["keys"]["method"] == "DP":
    return "—"
  common = sorted(set(r["seed_loss"]) & set(dp[0]["seed_loss"]))
  if not common:
    return "—"
  gaps = [100 * (r["seed_loss"][s] / dp[0]["seed_loss"][s] - 1) for s in common]
  mean, std = _stats(gaps)
  return f"{mean:+.2f} %" + (f" ± {std:.2f} ({len(gaps)} seeds)" if len(gaps) > 1 else "")


def _span(ns) -> str:
  """"3", or "1–3" where cells differ (the budget suite's M=4 cells have one seed)."""
  ns = sorted(set(ns))
  return str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def write_report(suite: str, rows: list[dict], docs: str, seeds: int,
                 cells: int | None = None) -> list[str]:
  """Writes docs/<suite>.md and the suite's PNGs; returns the files written."""
  import matplotlib  # noqa: PLC0415  (only the report needs it)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  os.makedirs(docs, exist_ok=True)
  files = []
  r0 = rows[0]
  # Cells may share a run (DP across H, the default in several suites): count each run once.
  wall = sum({r["run"].name: r["elapsed"] for r in rows}.values())
  head = (f"# {suite} suite\n\nGenerated by `experiments/reproduce.py --report` from the run "
          f"workdirs. {r0['params']:,} parameters, T={r0['run'].T} inner steps, "
          f"{r0['tokens']:,} training tokens per run (bytes), seeds per cell: "
          f"{_span(r['n'] for r in rows)}"
          + (" (loss: mean ± sample std; bits: mean)" if seeds > 1 else "") + ".\n\n"
          + (f"**Incomplete: {len(rows)} of the suite's {cells} cells have a finished run**; "
             "the tables and any best choice below cover those only (the same command "
             "resumes the rest).\n\n" if cells is not None and len(rows) < cells else ""))

  def save(fig, name):
    path = os.path.join(docs, f"{suite}_{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return os.path.basename(path)

  if suite == "main":
    # DP runs do not depend on H: list each once per (H, M) so every block reads on its own.
    cols = [("M", lambda r: str(r["keys"]["M"])), ("H", lambda r: str(r["keys"]["H"])),
            ("method", lambda r: r["label"]), *_COMMON, ("vs DP", lambda r: _rel(rows, r))]
    body = _table(rows, cols)
    Hs = sorted({r["keys"]["H"] for r in rows})
    Ms = sorted({r["keys"]["M"] for r in rows})
    fig, axes = plt.subplots(len(Ms), len(Hs), figsize=(5 * len(Hs), 3.6 * len(Ms)),
                             squeeze=False, sharey=True)
    for i, M in enumerate(Ms):
      for j, H in enumerate(Hs):
        ax = axes[i][j]
        for r in rows:
          if r["keys"]["M"] == M and r["keys"]["H"] == H and r["curve"]:
            x, y = zip(*r["curve"])
            ax.plot(x, y, marker=".", label=r["label"])
        ax.set_title(f"M={M}, H={H}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
        ax.legend()
        ax.grid(alpha=0.3)
    curves = save(fig, "curves")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"DP": "s", "DiLoCo": "o", "SD": "^"}
    seen = set()
    for r in rows:
      k = r["keys"]
      if (k["method"], k["M"], r["run"].name) in seen:
        continue
      seen.add((k["method"], k["M"], r["run"].name))
      color = "C0" if k["M"] == 2 else "C3"
      ax.errorbar(r["bits"], r["loss"], yerr=r["std"] or None, marker=markers[k["method"]],
                  color=color, linestyle="none", markersize=8)
      tag = k["method"] if k["method"] == "DP" else f"{k['method']} H={k['H']}"
      ax.annotate(f"{tag}, M={k['M']}", (r["bits"], r["loss"]), textcoords="offset points",
                  xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bits sent per worker (whole run, log)")
    ax.set_ylabel("final held-out loss (nats/byte)")
    ax.set_title("loss against bits sent (blue M=2, red M=4)")
    ax.grid(alpha=0.3, which="both")
    tradeoff = save(fig, "loss_vs_bits")
    plots = f"![loss curves]({curves})\n\n![loss against bits]({tradeoff})\n"
  elif suite == "overlap":
    cols = [("τ", lambda r: str(r["keys"]["tau"])), ("α", lambda r: f"{r['keys']['alpha']:g}"),
            *_COMMON]
    body = _table(rows, cols)
    fig, ax = plt.subplots(figsize=(6, 4))
    for a in sorted({r["keys"]["alpha"] for r in rows}):
      sel = [r for r in rows if r["keys"]["alpha"] == a]
      ax.errorbar([r["keys"]["tau"] for r in sel], [r["loss"] for r in sel],
                  yerr=[r["std"] for r in sel] if seeds > 1 else None, marker="o",
                  label=f"α={a:g}")
    ax.set_xlabel("overlap τ (inner steps a fragment is on the wire)")
    ax.set_ylabel("final held-out loss (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    plots = f"![loss against τ]({save(fig, 'tau')})\n"
  elif suite == "codecs":
    cols = [("codec", lambda r: r["keys"]["codec"]),
            ("error feedback", lambda r: "yes" if r["keys"]["error_feedback"] else "no"),
            *_COMMON]
    body = _table(rows, cols)
    codecs = list(dict.fromkeys(r["keys"]["codec"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for j, ef in enumerate((False, True)):
      xs, ys, es = [], [], []
      for i, c in enumerate(codecs):
        for r in rows:
          if r["keys"]["codec"] == c and r["keys"]["error_feedback"] == ef:
            xs.append(i + (j - 0.5) * width)
            ys.append(r["loss"])
            es.append(r["std"])
      ax.bar(xs, ys, width, yerr=es if seeds > 1 else None,
             label="with error feedback" if ef else "without")
    lo = min(r["loss"] for r in rows)
    hi = max(r["loss"] for r in rows)
    ax.set_ylim(lo - 0.5 * (hi - lo) - 0.005, hi + 0.5 * (hi - lo) + 0.005)
    ax.set_xticks(range(len(codecs)), codecs)
    ax.set_ylabel("final held-out loss (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    plots = f"![loss per codec]({save(fig, 'loss')})\n"
  elif suite == "fragments":
    cols = [("pattern", lambda r: r["keys"]["pattern"]),
            ("blocks/fragment", lambda r: str(r["keys"]["blocks"])), *_COMMON]
    body = _table(rows, cols)
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in ("strided", "sequential"):
      sel = [r for r in rows if r["keys"]["pattern"] == p]
      ax.plot([r["peak"] for r in sel], [r["loss"] for r in sel], marker="o", label=p)
      for r in sel:
        ax.annotate(f"{r['keys']['blocks']}", (r["peak"], r["loss"]), textcoords="offset points",
                    xytext=(5, 3), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("peak bits in one step (log; label: blocks per fragment)")
    ax.set_ylabel("final held-out loss (nats/byte)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    plots = f"![loss against peak bits]({save(fig, 'peak')})\n"
  elif suite == "sweep":
    body, plots = _sweep_report(rows, save, plt)
  elif suite == "faults":
    body, plots = _faults_report(rows, save, plt)
  elif suite == "budget":
    body, plots = _budget_report(rows, save, plt)
  else:
    cols = [("evaluated parameters", lambda r: r["keys"]["eval_params"]), *_COMMON]
    body = _table(rows, cols)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
      if r["curve"]:
        x, y = zip(*r["curve"])
        ax.plot(x, y, marker=".", label=r["keys"]["eval_params"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.legend()
    ax.grid(alpha=0.3)
    plots = f"![loss curves per evaluated copy]({save(fig, 'curves')})\n"
  path = os.path.join(docs, f"{suite}.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write(head + body + "\n\n" + plots
            + f"\nTraining time of these runs (sum over seeds): {wall / 60:.1f} min.\n")
  files.append(path)
  return files


def _sweep_report(rows, save, plt):
  """The η sweep: loss per (method, H, η), the best η per method in bold; loss against η."""
  best = {}
  for r in rows:
    k = (r["keys"]["method"], r["keys"]["H"])
    if k[0] != "DP" and (k not in best or r["loss"] < best[k]["loss"]):
      best[k] = r
  mark = lambda r, text: f"**{text}**" if best.get((r["keys"]["method"], r["keys"]["H"])) is r \
      else text
  cols = [("method", lambda r: r["label"]), ("H", lambda r: str(r["keys"]["H"] or "—")),
          ("η", lambda r: f"{r['keys']['lr']:g}" if r["keys"]["lr"] else "—"),
          ("eval loss", lambda r: mark(r, _fmt_loss(r))), ("vs DP", lambda r: _rel(rows, r))]
  fig, ax = plt.subplots(figsize=(6, 4))
  for (method, H) in best:
    sel = sorted((r for r in rows if (r["keys"]["method"], r["keys"]["H"]) == (method, H)),
                 key=lambda r: r["keys"]["lr"])
    ax.plot([r["keys"]["lr"] for r in sel], [r["loss"] for r in sel], marker="o",
            label=f"{method} H={H}")
  for r in rows:
    if r["keys"]["method"] == "DP":
      ax.axhline(r["loss"], color="k", linestyle="--", label="data-parallel")
  ax.set_xlabel("outer learning rate η (Nesterov, μ = 0.9)")
  ax.set_ylabel("final held-out loss (nats/byte)")
  ax.legend()
  ax.grid(alpha=0.3)
  chosen = ", ".join(f"{m} H={h}: η = {r['keys']['lr']:g}" for (m, h), r in best.items())
  return (_table(rows, cols) + f"\n\nBest η (lowest final loss): {chosen}.",
          f"![loss against η]({save(fig, 'lr')})\n")


def _faults_report(rows, save, plt):
  """Loss and perplexity against the drop probability, each method against its drop-0 run."""
  base = {r["keys"]["method"]: r for r in rows if not r["keys"]["drop"]}

  def vs_clean(r, f):
    b = base.get(r["keys"]["method"])
    return "—" if b is None or b is r else f(r, b)

  cols = [("method", lambda r: r["label"]),
          ("drop probability", lambda r: f"{r['keys']['drop']:g}"), *_COMMON,
          ("vs DP", lambda r: _rel(rows, r)),
          ("loss vs drop 0", lambda r: vs_clean(
              r, lambda r, b: f"{100 * (r['loss'] / b['loss'] - 1):+.2f} %")),
          ("perplexity vs drop 0", lambda r: vs_clean(
              r, lambda r, b: f"{100 * (math.exp(r['loss'] - b['loss']) - 1):+.2f} %"))]
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in ("DiLoCo", "SD"):
    sel = sorted((r for r in rows if r["keys"]["method"] == method), key=lambda r: r["keys"]["drop"])
    if sel:
      ax.plot([r["keys"]["drop"] for r in sel], [r["loss"] for r in sel], marker="o",
              label="DiLoCo" if method == "DiLoCo" else "Streaming DiLoCo")
  for r in rows:
    if r["keys"]["method"] == "DP":
      ax.axhline(r["loss"], color="k", linestyle="--", label="data-parallel")
  ax.set_xlabel("probability that a worker's outer gradient is dropped at a sync")
  ax.set_ylabel("final held-out loss (nats/byte)")
  ax.legend()
  ax.grid(alpha=0.3)
  return (_table(rows, cols) + "\n\nPerplexity is per byte, exp(loss). The DiLoCo paper "
          "(Douillard et al. 2023, 8 workers, 150M parameters) reports ≈ 2 % higher perplexity "
          "with 50 % of the outer gradients dropped. Each worker is dropped independently at "
          "each sync (each fragment's, for Streaming DiLoCo); a dropped worker restarts from θ_g "
          "at the next step, keeping its inner optimizer state. Bits: each of the k workers in "
          "a sync sends the k-worker all-reduce payload (nothing when k < 2), averaged over the "
          "M workers, so they fall faster than the share of workers that report.",
          f"![loss against drop probability]({save(fig, 'drop')})\n")


def _budget_report(rows, save, plt):
  """The headline at budget: the table, the targets met or not, and the M=2 loss curves."""
  cols = [("M", lambda r: str(r["keys"]["M"])), ("H", lambda r: str(r["keys"]["H"] or "—")),
          ("method", lambda r: r["label"]),
          ("η", lambda r: f"{r['run'].outer_lr:g}" if r["run"].outer_lr else "—"),
          ("seeds", lambda r: str(r["n"])), *_COMMON, ("vs DP", lambda r: _rel(rows, r)),
          ("vs DP, paired by seed", lambda r: _paired(rows, r))]
  lines = []
  for H in sorted({r["keys"]["H"] for r in rows if r["keys"]["method"] == "SD"}):
    sd = [r for r in rows if r["keys"] == dict(method="SD", H=H, M=2, delay="τ=1")]
    dp = _dp_beside(rows, sd[0]) if sd else []
    if not dp:
      continue
    gap = 100 * (sd[0]["loss"] / dp[0]["loss"] - 1)
    lines.append(f"- Streaming DiLoCo H={H}, M=2, within +2 % of data-parallel: "
                 f"{'met' if gap <= 2 else '**not met**'} ({gap:+.2f} % of the means; "
                 f"paired by seed {_paired(rows, sd[0])})")
    if H >= 100:
      ratio = sd[0]["dp_bits"] / sd[0]["bits"]
      lines.append(f"- Streaming DiLoCo H={H}, ≥ 400× fewer bits than data-parallel: "
                   f"{'met' if ratio >= 400 else '**not met**'} ({ratio:.0f}×)")
  where = _gap_over_training([r for r in rows if "batch" not in r["keys"]])
  twice = _at_twice_the_batch(rows)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in rows:
    if r["keys"]["M"] == 2 and r["curve"]:
      x, y = zip(*r["curve"])
      H = r["keys"]["H"]
      ax.plot(x, y, marker=".", label=r["label"] + (f" H={H}" if H else ""))
  ax.set_xlabel("training tokens (bytes)")
  ax.set_ylabel("held-out loss (nats/byte)")
  ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return (_table(rows, cols) + "\n\n## Targets\n\n" + "\n".join(lines)
          + (f"\n\n{where}" if where else "") + (f"\n\n{twice}" if twice else ""),
          f"![loss curves, M=2]({save(fig, 'curves')})\n")


def _gap_over_training(rows) -> str:
  """Where the gap to data-parallel is, along the run (M=2, τ=1 cells; % paired by seed, mean
  over the seeds both finished): θ_g's held-out loss at each evaluation, and the workers' own
  training loss (the logged steps since the previous evaluation; each worker on its half of the
  global batch that data-parallel trains on, so the same bytes are scored). If the workers
  trail by as much as θ_g, the gap is made inside the workers, not by averaging them."""
  dp = [r for r in rows if r["keys"]["method"] == "DP" and r["keys"]["M"] == 2]
  cells = [r for r in rows if r["keys"]["M"] == 2 and r["keys"]["method"] != "DP"
           and r["keys"].get("delay", "") in ("", "τ=1")]
  if not dp or not cells or not dp[0]["seed_evals"]:
    return ""
  dp = dp[0]
  seeds0 = sorted(dp["seed_evals"])
  points = [s for s, _ in dp["seed_evals"][seeds0[0]]]
  head = ("## Where the gap is, along the run\n\nM=2, % over data-parallel paired by seed "
          "(mean over seeds): *held-out* is θ_g's evaluation loss at the step; *workers* is "
          "the workers' own training loss, logged since the previous evaluation, on the same "
          "bytes data-parallel trains on at those steps.\n\n"
          "| method | loss | " + " | ".join(f"{p:,}" for p in points) + " |\n"
          "|---|---|" + "---|" * len(points))
  out = [head]
  for r in cells:
    seeds = sorted(set(r["seed_evals"]) & set(dp["seed_evals"]))
    held, work = [], []
    for i, p in enumerate(points):
      lo = points[i - 1] if i else 0
      h, w = [], []
      for s in seeds:
        ev, dv = dict(r["seed_evals"][s]), dict(dp["seed_evals"][s])
        if p in ev and p in dv:
          h.append(100 * (ev[p] / dv[p] - 1))
        tr, dt = dict(r["seed_train"][s]), dict(dp["seed_train"][s])
        both = [t for t in tr if lo < t <= p and t in dt]
        if both:
          w.append(100 * (sum(tr[t] for t in both) / sum(dt[t] for t in both) - 1))
      held.append(f"{sum(h) / len(h):+.1f}" if h else "–")
      work.append(f"{sum(w) / len(w):+.1f}" if w else "–")
    H = r["keys"]["H"]
    name = f"{r['label']} H={H}" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
    out.append(f"| {name} | held-out | " + " | ".join(held) + " |")
    out.append(f"| {name} | workers | " + " | ".join(work) + " |")
  return "\n".join(out)


def _at_twice_the_batch(rows) -> str:
  """The 2×-batch cells against the budget's, seed 0 in both (the only seed the 2× cells have):
  Streaming DiLoCo's gap to data-parallel at each batch."""
  twice = [r for r in rows if r["keys"].get("batch") and r["keys"]["method"] == "SD"]
  if not twice:
    return ""
  h, b2 = twice[0]["keys"]["H"], twice[0]["keys"]["batch"]
  gaps = {}
  for batch, sd in ((None, [r for r in rows
                            if r["keys"] == dict(method="SD", H=h, M=2, delay="τ=1")]),
                    (b2, twice)):
    dp = _dp_beside(rows, sd[0]) if sd else []
    s, d = (sd[0]["seed_loss"].get(0), dp[0]["seed_loss"].get(0)) if dp else (None, None)
    gaps[batch] = f"{100 * (s / d - 1):+.2f} %" if s and d else "not run yet"
  return ("## At twice the batch\n\nThe same bytes (to 0.05 %) in half the steps, every batch "
          f"doubled ({b2} windows per step in all; each Streaming DiLoCo worker at the batch "
          f"data-parallel averages at the budget's). Streaming DiLoCo H={h} over data-parallel, "
          f"seed 0: {gaps[None]} at the budget's batch, {gaps[b2]} at twice it.")


def report(suites, out, docs, seeds, steps=0, log=print, smoke=False) -> list[str]:
  files = []
  for suite in suites:
    scale = scale_for(suite, smoke)
    try:
      rows = collect(suite, out, scale, seeds, steps)
    except SweepNotDone as e:
      log(f"{suite}: {e}")
      continue
    if not rows:
      log(f"{suite}: no finished runs under {out}, nothing to report")
      continue
    files += write_report(suite, rows, docs, seeds, len(cells_for(suite, scale, steps, out)))
  return files


# -------------------------------------------------------------------------------------- CLI
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  suite = _SUITE.value
  if suite not in (*ALL_SUITES, "all"):
    print(f"reproduce: --suite must be one of {', '.join(ALL_SUITES)} or all, got "
          f"{suite!r}.", file=sys.stderr)
    return 2
  suites = SUITES if suite == "all" else (suite,)
  archive = archive_lib.folder(_ARCHIVE.value, _DOCS.value, _OUT.value)
  if not _REPORT.value:   # the report reads JSON files only: no JAX
    from absl import logging  # noqa: PLC0415
    from diloco_jax import mesh  # noqa: PLC0415
    mesh.set_cpu_device_count(4)   # the most workers any suite uses (M=4), one device each
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from diloco_jax.config import ConfigError  # noqa: PLC0415
    for s in suites:
      t0 = time.perf_counter()
      try:
        run_suite(s, _OUT.value, scale_for(s, _SMOKE.value), _DATA.value, _SEEDS.value,
                  _STEPS.value, _ONLY.value, log=lambda m: print(m, flush=True),
                  archive=archive)
      except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
      except SweepNotDone as e:
        print(f"reproduce: {e}.", file=sys.stderr)
        return 2
      print(f"suite {s}: {time.perf_counter() - t0:.0f} s", flush=True)
  elif archive:
    archive_lib.restore(archive, _OUT.value)
  for path in report(suites, _OUT.value, _DOCS.value, _SEEDS.value, _STEPS.value,
                     smoke=_SMOKE.value):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  app.run(main)
