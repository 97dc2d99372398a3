"""Does Streaming DiLoCo's needle short stage learn to copy? The short stage of
experiments/configs/long_context.py over seeds × outer learning rates η, each run evaluated
inside its window, and a report that says how often each η learnt to copy.

Why: on one seed the short stage learnt to copy at η=0.8 and not at η=0.4, and the same seed at
η=0.4 learnt on one machine and not on another (docs/long_context.md). One draw cannot move
the recipe; this suite is the evidence that can.

Each run is the user-facing commands (so a row can be reproduced by hand):
  python -m diloco_jax.main --config=experiments/configs/long_context.py:short \
      --config.diloco.outer_lr=ETA --config.seed=SEED --workdir=OUT/streaming_short_etaE_sS
  python -m diloco_jax.evals.needle --workdir=W --out=W/needle_short --lengths=256,320 \
      --variants=single,multikey
A run whose summary.json exists is not trained again, an evaluation whose JSON exists is not run
again. Finished runs' small files go to --archive (default docs/results/runs/needle_seeds) and
come back from there into an empty --out, so the report (docs/results/needle_seeds.md) rebuilds
on a fresh clone and a later session adds seeds without training the earlier ones again.

  python experiments/needle_seeds.py --seeds=0,1,2 --outer_lrs=0.4,0.8
  python experiments/needle_seeds.py --report
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from diloco_jax import archive as archive_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "experiments", "configs", "long_context.py")
_OUT = flags.DEFINE_string("out", "runs/needle_seeds", "root of the run workdirs")
_DOCS = flags.DEFINE_string("docs", os.path.join(REPO, "docs", "results"),
                            "where needle_seeds.md goes")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "config seeds (model init and data order)")
_ETAS = flags.DEFINE_list("outer_lrs", ["0.4", "0.8"], "outer learning rates η")
_REPORT = flags.DEFINE_bool("report", False, "only rebuild the report from --out")
_ARCHIVE = flags.DEFINE_string(
    "archive", None, "folder of finished runs' small files (diloco_jax/archive.py); default "
    "DOCS/runs/<basename of --out>; '' for none")

LENGTHS = (256, 320)           # inside the short stage's 320-byte window
VARIANTS = ("single", "multikey")
COPY_RECALL = 0.9              # single-needle recall at 320 bytes that counts as "learnt to copy"
ANSWER_NATS = (1.0, 0.3)       # thresholds of the answer loss's first crossing
EVAL_FILES = ("needle_short/needle.json", "needle_short/needle_single.png",
              "needle_short/needle_multikey.png")


def run_name(eta: float, seed: int) -> str:
  """streaming_short_eta08_s1 for η=0.8, seed 1 (the digits of η without the point)."""
  return f"streaming_short_eta{f'{eta:g}'.replace('.', '')}_s{seed}"


def parse_grid(etas, seeds) -> list[tuple[float, int]]:
  """The (η, seed) pairs of the flags; one clear error for a bad value, before anything runs."""
  grid = []
  for text in etas:
    try:
      eta = float(text)
    except ValueError:
      raise ValueError(f"--outer_lrs: {text!r} is not a number") from None
    if not eta > 0:
      raise ValueError(f"--outer_lrs: η must be > 0, got {text}")
    for s in seeds:
      if not s.strip().isdigit():
        raise ValueError(f"--seeds: {s!r} is not a non-negative integer")
      grid.append((eta, int(s)))
  return grid


def _cli(module: str, *args: str) -> None:
  cmd = [sys.executable, "-m", module, *args]
  print("  $", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)


def run_all(out: str, grid, archive: str) -> None:
  if archive:
    archive_lib.restore(archive, out)
  for i, (eta, seed) in enumerate(grid):
    name = run_name(eta, seed)
    wd = os.path.join(out, name)
    print(f"[{i + 1}/{len(grid)}] {name}", flush=True)
    if not archive_lib.finished(wd):
      _cli("diloco_jax.main", f"--config={CONFIG}:short", f"--config.diloco.outer_lr={eta}",
           f"--config.seed={seed}", f"--workdir={wd}")
    if not os.path.exists(os.path.join(wd, EVAL_FILES[0])):
      _cli("diloco_jax.evals.needle", f"--workdir={wd}", f"--out={wd}/needle_short",
           f"--lengths={','.join(map(str, LENGTHS))}", f"--variants={','.join(VARIANTS)}")
    if archive:
      archive_lib.save(wd, os.path.join(archive, name),
                       files=archive_lib.FILES + archive_lib.PLOTS + EVAL_FILES)


# ------------------------------------------------------------------------------------ report
def first_below(rows: list[dict], threshold: float, window: int = 3) -> int | None:
  """The first logged step at which the mean answer loss (`ce_upweighted`) of this and the
  previous window-1 logs is below `threshold` (None: never)."""
  vals = [(r["step"], r["ce_upweighted"]) for r in rows if "ce_upweighted" in r]
  for i in range(window - 1, len(vals)):
    if sum(v for _, v in vals[i - window + 1:i + 1]) / window < threshold:
      return vals[i][0]
  return None


def summarize(wd: str) -> dict | None:
  """One finished run's row: its η and seed, the answer loss's crossings and last-5 mean, recall
  per variant at each evaluated length, held-out loss and wall time (None: not finished)."""
  if not archive_lib.finished(wd):
    return None
  with open(os.path.join(wd, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  with open(os.path.join(wd, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  answer = [r["ce_upweighted"] for r in rows if "ce_upweighted" in r][-5:]
  recall = None
  path = os.path.join(wd, EVAL_FILES[0])
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      nd = json.load(f)
    recall = {v: {p["length"]: p["recall"] for p in per} for v, per in nd["per_length"].items()}
  return {"eta": cfg["diloco"]["outer_lr"], "seed": cfg["seed"],
          "crossings": {t: first_below(rows, t) for t in ANSWER_NATS},
          "answer_loss": sum(answer) / len(answer) if answer else None,
          "recall": recall, "held_out": summary["final_eval_loss"],
          "minutes": summary["wall_time_s"] / 60,
          "isa": summary.get("host", {}).get("vector_isa")}   # absent in older runs


def _f(x, fmt: str) -> str:
  return "–" if x is None else format(x, fmt)


def write_report(out: str, docs: str) -> list[str]:
  runs = {}
  if os.path.isdir(out):
    for name in sorted(os.listdir(out)):
      s = summarize(os.path.join(out, name))
      if s is not None:
        runs[name] = s
  if not runs:
    return []
  last = LENGTHS[-1]
  lines = [
      "# Needle short stage over seeds: does Streaming DiLoCo learn to copy?", "",
      "Written by `python experiments/needle_seeds.py` on 2 CPU cores. Each run is the short "
      "stage of `experiments/configs/long_context.py` (Streaming DiLoCo, M=2, H=30, τ=1, "
      "α=0.5, E3M0; windows of 320 bytes) with its outer learning rate η and seed "
      "(`--config.diloco.outer_lr`, `--config.seed`), evaluated inside its window by "
      f"`python -m diloco_jax.evals.needle` at {' and '.join(map(str, LENGTHS))} bytes "
      "(11 depths × 5 trials, episode seed 0 for every run). Answer loss: `ce_upweighted`, "
      "the loss of the weighted answer bytes (chance ln 10 = 2.303 nats); 'below x at' is the "
      "first logged step whose mean over 3 logs is below x. Learnt to copy: single-needle "
      f"recall ≥ {COPY_RECALL:g} at {last} bytes. Runs of one seed on different machines need "
      "not agree to the bit (docs/long_context.md); the CPU column is the widest vector "
      "extension of the machine that trained the run, from its summary.json (– where the "
      "trainer did not record it yet).", "",
      "| run | η | seed | answer loss below 1.0 / 0.3 at | answer loss, last 5 logs | "
      f"single {' / '.join(map(str, LENGTHS))} | 4 keys {last} | held-out loss | minutes | CPU |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  for name, s in runs.items():
    r = s["recall"] or {}
    single = " / ".join(_f(r.get("single", {}).get(x), ".2f") for x in LENGTHS)
    lines.append(
        f"| {name} | {s['eta']:g} | {s['seed']} | "
        f"{' / '.join(_f(s['crossings'][t], 'd') for t in ANSWER_NATS)} | "
        f"{_f(s['answer_loss'], '.3f')} | {single} | "
        f"{_f(r.get('multikey', {}).get(last), '.2f')} | {s['held_out']:.4f} | "
        f"{s['minutes']:.1f} | {s['isa'] or '–'} |")
  lines += ["", f"Per η (evaluated runs only; recall at {last} bytes):", "",
            "| η | runs | learnt to copy | mean single | mean 4 keys | mean answer loss | "
            "mean held-out loss |", "|---|---|---|---|---|---|---|"]
  for eta in sorted({s["eta"] for s in runs.values()}):
    group = [s for s in runs.values() if s["eta"] == eta and s["recall"]]
    if not group:
      continue
    single = [s["recall"]["single"][last] for s in group]
    keys = [s["recall"]["multikey"][last] for s in group]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines.append(f"| {eta:g} | {len(group)} | {sum(x >= COPY_RECALL for x in single)} of "
                 f"{len(group)} | {mean(single):.2f} | {mean(keys):.2f} | "
                 f"{mean([s['answer_loss'] for s in group]):.3f} | "
                 f"{mean([s['held_out'] for s in group]):.4f} |")
  os.makedirs(docs, exist_ok=True)
  with open(os.path.join(docs, "needle_seeds.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  archive = archive_lib.folder(_ARCHIVE.value, _DOCS.value, _OUT.value)
  if not _REPORT.value:
    try:
      grid = parse_grid(_ETAS.value, _SEEDS.value)
    except ValueError as e:
      print(f"needle_seeds: {e}", file=sys.stderr)
      return 2
    run_all(_OUT.value, grid, archive)
  elif archive:
    archive_lib.restore(archive, _OUT.value)
  if not write_report(_OUT.value, _DOCS.value):
    print(f"needle_seeds: no finished run under {_OUT.value} (nor in the archive): no report "
          "written.", file=sys.stderr)
    return 1
  print(f"wrote {os.path.join(_DOCS.value, 'needle_seeds.md')}")
  return 0


if __name__ == "__main__":
  app.run(main)
