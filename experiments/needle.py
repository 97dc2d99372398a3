"""Needle in a haystack: the retrieval model trained with Streaming DiLoCo and data-parallel,
its heat maps, recall per length, effective length and long-context loss, and the report.

Runs (experiments/configs/long_context.py:retrieval, byte-level english-pd, equal tokens):

  streaming   Streaming DiLoCo M=2, H=30, τ=1, α=0.5, E3M0
  dp          data-parallel, the M=2 workers' batches averaged every step

After training, each run is evaluated by the user-facing commands:
  python -m diloco_jax.evals.needle --workdir=W --out=W/needle --variants=... --lengths=...
  python -m diloco_jax.evals.perplexity --workdir=W --out=W/ppl --seq_len=...
A run whose summary.json exists is not trained again, an evaluation whose JSON exists is not run
again, so an interrupted suite resumes. The report (docs/results/needle.md and the PNGs next to
it) is rebuilt from the workdirs; `--report` only does that. Finished runs' small files
(summary, config, metrics, the evaluations' JSON and plots) are also copied to --archive
(default docs/results/runs/<basename of --out>, committed) and restored from there into an
empty --out, so the report rebuilds on a fresh clone and a missing run can be added later
(`diloco_jax/archive.py`; a restored short stage has no checkpoint, so a continuation that
still has to run trains it again).

  python experiments/needle.py --out=runs/needle
  python experiments/needle.py --out=runs/needle --report
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

from diloco_jax import archive as archive_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUT = flags.DEFINE_string("out", "runs/needle", "root of the run workdirs")
_DOCS = flags.DEFINE_string("docs", os.path.join(REPO, "docs", "results"),
                            "where needle.md and its PNGs go")
_DATA = flags.DEFINE_string("data", os.path.join(REPO, "..", "shared", "data", "english-pd",
                                                 "*.txt"), "text files (glob) to train on")
_STEPS = flags.DEFINE_integer("steps", 0, "inner steps T (0: the config's)")
_REPORT = flags.DEFINE_bool("report", False, "only rebuild the report from --out")
_ONLY = flags.DEFINE_list("only", [], "run only these runs")
_LENGTHS = flags.DEFINE_list("lengths", ["256", "512", "1024", "2048"],
                             "needle prompt lengths (bytes)")
_VARIANTS = flags.DEFINE_list("variants", ["single", "multikey"],
                              "needle variants evaluated")
_TRIALS = flags.DEFINE_integer("trials", 5, "episodes per (length, depth) cell")
_DEPTHS = flags.DEFINE_integer("depths", 11, "depths from 0 % to 100 %")
_ARCHIVE = flags.DEFINE_string(
    "archive", None, "folder of finished runs' small files, committed with the code "
    "(diloco_jax/archive.py): restored into --out first, each finished run copied there; "
    "default DOCS/runs/<basename of --out>; '' for none")
_LONG_SET = flags.DEFINE_list(
    "long_set", [], "config overrides KEY=VALUE for the long stages only (e.g. "
    "model.rope_scaling=yarn,model.rope_scaling_factor=4,model.rope_original_length=320): a "
    "recipe probe that continues the same short stages (link them into a fresh --out)")
_PPL_LEN = flags.DEFINE_integer("ppl_seq_len", 0, "window of the long-context loss (0: the "
                                "training window)")

# name -> (config argument, algorithm, the run it continues)
RUNS = {"streaming_short": ("short", "streaming", None),
        "streaming": ("long", "streaming", "streaming_short"),
        "dp_short": ("short", "dp", None),
        "dp": ("long", "dp", "dp_short")}
EVALUATED = ("streaming", "dp")


def _family():
  spec = importlib.util.spec_from_file_location(
      "long_context", os.path.join(REPO, "experiments", "configs", "long_context.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_config(name: str, data_glob: str, steps: int, out: str = "", long_set=()):
  arg, algorithm, parent = RUNS[name]
  c = _family().get_config(arg)
  c.algorithm = algorithm
  c.data.paths = (data_glob,)
  if steps and arg == "short":
    c.train.num_steps = steps
  if parent:
    c.train.init_from = os.path.join(out, parent)
    for item in long_set:
      _override(c, item)
  return c


def _override(c, item: str) -> None:
  """Applies one "a.b.c=value" (`--long_set`); the value is a Python literal or else a string."""
  from diloco_jax.config import ConfigError  # noqa: PLC0415
  key, sep, text = item.partition("=")
  *path, leaf = key.strip().split(".")
  node = c
  try:
    for part in path:
      node = node[part]
    node[leaf]   # an unknown key fails here, not as a new field
  except KeyError:
    raise ConfigError(f"--long_set: {key!r} is not a config key") from None
  if not sep:
    raise ConfigError(f"--long_set items are KEY=VALUE, got {item!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"--long_set: {key}={text} has the wrong type ({e})") from None


def _cli(module: str, *args: str) -> None:
  cmd = [sys.executable, "-m", module, *args]
  print("  $", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)


def evaluate(wd: str) -> None:
  """The needle heat maps and the long-context loss of one finished run (skipped when their
  JSON exists)."""
  if not os.path.exists(os.path.join(wd, "needle", "needle.json")):
    _cli("diloco_jax.evals.needle", f"--workdir={wd}", f"--out={wd}/needle",
         f"--lengths={','.join(_LENGTHS.value)}", f"--variants={','.join(_VARIANTS.value)}",
         f"--trials={_TRIALS.value}", f"--depths={_DEPTHS.value}")
  if not os.path.exists(os.path.join(wd, "ppl", "perplexity.json")):
    _cli("diloco_jax.evals.perplexity", f"--workdir={wd}", f"--out={wd}/ppl",
         *([f"--seq_len={_PPL_LEN.value}"] if _PPL_LEN.value else []))


def run_all(out: str, data_glob: str, steps: int, only=(), archive: str = "",
            long_set=()) -> None:
  """Trains and evaluates every run of `only` (all when empty) not finished yet. With `archive`
  (`diloco_jax.archive`), archived runs count as finished and every finished run is archived;
  a short stage restored without checkpoints trains again when its continuation still has to
  run (the continuation starts from its checkpoint)."""
  from diloco_jax import config as config_lib, train  # noqa: PLC0415
  todo = [n for n in RUNS if not only or n in only]
  for n in todo:   # every config error before the first run trains (a continuation's
    c = make_config(n, data_glob, steps, out, long_set)   # init_from exists only once its
    if RUNS[n][2]:                                         # short run is done: checked bare)
      c.train.init_from = ""
    config_lib.from_config_dict(c)
  if archive:
    archive_lib.restore(archive, out)
  for p in archive_lib.parents_to_retrain(out, {n: r[2] for n, r in RUNS.items()}, todo):
    print(f"{p}: restored without checkpoints, trained again for its continuation", flush=True)
    shutil.rmtree(os.path.join(out, p))
  for i, n in enumerate(todo):
    wd = os.path.join(out, n)
    if archive_lib.finished(wd):
      print(f"[{i + 1}/{len(todo)}] {n}: trained, skipped", flush=True)
    else:
      t0 = time.perf_counter()
      s = train.run(make_config(n, data_glob, steps, out, long_set), wd)
      print(f"[{i + 1}/{len(todo)}] {n}: eval loss {s['final_eval_loss']:.4f}, "
            f"{time.perf_counter() - t0:.0f} s", flush=True)
    if n in EVALUATED:
      evaluate(wd)
    if archive:
      archive_lib.save(wd, os.path.join(archive, n))


# ------------------------------------------------------------------------------------ report
def _json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _pct(x) -> str:
  return "–" if x is None else f"{x:.2f}"


def _rows(wd: str) -> list[dict]:
  with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _config(out: str, name: str):
  """The run's own config (its config.json) when it has run, else what it would run with."""
  import ml_collections  # noqa: PLC0415
  saved = _json(os.path.join(out, name, "config.json"))
  if saved is not None:
    return ml_collections.ConfigDict(saved)
  return make_config(name, _DATA.value, _STEPS.value, out)


def _rope_text(m) -> str:
  """How the long stage's RoPE treats the 4× longer window (`model.rope_*`)."""
  if m.rope_scaling == "none":
    return "RoPE unscaled"
  if m.rope_scaling == "linear":
    return f"RoPE position interpolation, s = {m.rope_scaling_factor:g}"
  return (f"RoPE scaled by YaRN, s = {m.rope_scaling_factor:g} from the trained "
          f"{m.rope_original_length} bytes")


def write_report(out: str, docs: str) -> list[str]:
  stages = {}
  for n in RUNS:
    wd = os.path.join(out, n)
    s = _json(os.path.join(wd, "summary.json"))
    if s is not None:
      stages[n] = {"summary": s, "needle": _json(os.path.join(wd, "needle", "needle.json")),
                   "ppl": _json(os.path.join(wd, "ppl", "perplexity.json")), "rows": _rows(wd)}
  done = {n: stages[n] for n in EVALUATED if n in stages}
  if not done:
    return []
  short, cfg = _config(out, "streaming_short"), _config(out, "streaming")
  L, r = cfg.data.seq_len, cfg.data.retrieval
  walls = {n: sum(d["summary"]["wall_time_s"] for m, d in stages.items() if m.startswith(n))
           for n in EVALUATED}
  lines = [
      "# Needle in a haystack: a small byte-level model that retrieves, Streaming DiLoCo vs "
      "data-parallel", "",
      "Written by `python experiments/needle.py --out=runs/needle` (trains, evaluates with "
      "`python -m diloco_jax.evals.needle` and `python -m diloco_jax.evals.perplexity`, then "
      "writes this report) on 2 CPU cores, no accelerator. Model and data: "
      "`experiments/configs/long_context.py` (\"train short, continue long\"): "
      f"{cfg.model.num_layers} blocks, d_model {cfg.model.d_model}, {cfg.model.num_heads} heads "
      f"of {cfg.model.d_model // cfg.model.num_heads}, byte-level english-pd. Stage `short`: "
      f"{short.train.num_steps} steps on windows of {short.data.seq_len} bytes; stage `long`: "
      f"its outer parameters continued (fresh optimizer state) for {cfg.train.num_steps} steps "
      f"on windows of {L} bytes (4×, {_rope_text(cfg.model)}, blockwise attention). In both, "
      f"{r.fraction:.0%} of the windows are packs of retrieval episodes ({', '.join(r.variants)}; "
      f"{r.num_needles} needles in the multi-key ones, {r.value_digits}-digit values, answer "
      f"bytes weighted {r.answer_weight:g}×, log-uniform episode lengths up to the window, "
      "positions restarting and no attention across episodes), the rest plain text. M=2 "
      f"workers × {short.train.batch_size} / {cfg.train.batch_size} windows per step. "
      f"Streaming DiLoCo: H={cfg.diloco.inner_steps}, τ={cfg.diloco.overlap_steps}, "
      f"α={cfg.diloco.merge_alpha:g}, {cfg.diloco.codec}, outer lr η "
      f"{short.diloco.outer_lr:g} / {cfg.diloco.outer_lr:g} (short / long); data-parallel: "
      "the same batches averaged every step. Wall "
      "times: " + ", ".join(f"{n} {w / 60:.1f} min (both stages, compilation and "
      "in-training evals included)" for n, w in walls.items() if w) + ".", "",
      "Evaluation (SPEC §6.3, Gemini's protocol with RULER's variants): haystacks from the "
      "held-out tail of each english-pd file (never trained on), the needle \"The special magic "
      "{city} number is: {number}.\" at depths 0 %, 10 %, … 100 % snapped back to a sentence "
      "start, the question last, greedy decoding, exact match; multi-value and multi-query "
      "score the fraction of values recovered. Lengths are whole prompts in bytes; a length "
      "above the training window is extrapolation (marked *). Control: the same prompts with "
      "the needle removed (chance is 1e-7).", "",
      "| run | held-out loss | variant | recall per length | effective length | control |",
      "|---|---|---|---|---|---|"]
  for n, d in done.items():
    s = d["summary"]
    nd = d["needle"]
    if nd is None:
      lines.append(f"| {n} | {s['final_eval_loss']:.4f} | – | not evaluated | – | – |")
      continue
    for v in nd["variants"]:
      per = nd["per_length"][v]
      recall = " · ".join(f"{p['length']}{'*' if p['extrapolation'] else ''}: "
                          f"{_pct(p['recall'])}" for p in per)
      ctrl = max((p["control"] or 0.0) for p in per)
      eff = nd["effective_length"][v]
      lines.append(f"| {n} | {s['final_eval_loss']:.4f} | {v} | {recall} | "
                   f"{eff if eff is not None else '< ' + str(nd['lengths'][0])} | "
                   f"{ctrl:.2f} |")
  missing = [n for n in EVALUATED if n not in done]
  if missing:
    lines[2:2] = [f"**Incomplete: no finished run of {', '.join(missing)} in this report** "
                  f"(`python experiments/needle.py --only="
                  f"{','.join(m for n in missing for m in (n + '_short', n))}` adds it).", ""]
  lines += ["", "Answer cross-entropy during training (`ce_upweighted`: the mean loss of the "
            "weighted answer bytes over the last 5 logged steps of each stage; chance for a "
            "random digit is ln 10 = 2.303 nats):", ""]
  for n, d in stages.items():
    vals = [r["ce_upweighted"] for r in d["rows"] if "ce_upweighted" in r][-5:]
    if vals:
      lines.append(f"- {n}: {sum(vals) / len(vals):.3f} nats/byte at step "
                   f"{d['rows'][-1]['step']}, held-out text loss "
                   f"{d['summary']['final_eval_loss']:.4f}")
  lines += ["", "## Targets", ""]

  def check(label, ok, detail):
    mark = "–" if ok is None else ("met" if ok else "**not met**")
    lines.append(f"- {label}: {mark} ({detail})")

  for n, d in done.items():
    nd = d["needle"]
    if nd is None:
      continue
    trained = [x for x in nd["lengths"] if x <= L]
    cells = [c for c in nd["cells"] if c["length"] in trained]
    single = [c["recall"] for c in cells if c["variant"] == "single" and c["recall"] is not None]
    worst = min(single) if single else None
    check(f"{n}: single-needle recall ≥ 99 % in every depth cell at every trained length "
          f"({', '.join(map(str, trained))})", None if worst is None else worst >= 0.99,
          f"worst cell {worst:.2f}" if worst is not None else "not evaluated")
    mk = [p for p in nd["per_length"].get("multikey", [])
          if p["length"] in trained and p["recall"] is not None]
    if mk:
      low = min(p["recall"] for p in mk)
      check(f"{n}: 4-key recall ≥ 90 % at every trained length", low >= 0.90,
            "per length " + ", ".join(f"{p['length']}: {p['recall']:.2f}" for p in mk))
    ctrl = [c["recall"] for c in nd["control"] if c["recall"] is not None]
    if ctrl:
      check(f"{n}: the needle-free control stays at chance", max(ctrl) <= 0.05,
            f"highest control recall {max(ctrl):.2f}")
  lines += ["", "## Heat maps", ""]
  os.makedirs(docs, exist_ok=True)
  for n, d in done.items():
    if d["needle"] is None:
      continue
    for v in d["needle"]["variants"]:
      src = os.path.join(out, n, "needle", f"needle_{v}.png")
      if os.path.exists(src):
        name = f"needle_{n}_{v}.png"
        shutil.copyfile(src, os.path.join(docs, name))
        lines.append(f"![{n} {v}]({name})")
  lines += ["", "## Long-context loss", ""]
  for n, d in done.items():
    p = d["ppl"]
    if p is None:
      continue
    fit = p["fit"]
    law = ("no fit" if fit is None else f"L(x) = {fit['alpha']:.3f}·x^{fit['beta']:.3f} + "
           f"{fit['gamma']:.3f} (RMS error {fit['rmse']:.4f})")
    lines.append(f"- {n}: cumulative mean loss over the first x bytes of {p['windows']} "
                 f"held-out windows of {p['seq_len']} bytes: {law}; mean loss "
                 f"{p['mean_loss']:.4f}" + (" (beyond the training window: extrapolation)"
                                           if p["extrapolation"] else ""))
    src = os.path.join(out, n, "ppl", "perplexity.png")
    if os.path.exists(src):
      shutil.copyfile(src, os.path.join(docs, f"needle_{n}_loss.png"))
      lines.append(f"\n![{n} long-context loss](needle_{n}_loss.png)\n")
  path = os.path.join(docs, "needle.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  archive = archive_lib.folder(_ARCHIVE.value, _DOCS.value, _OUT.value)
  if not _REPORT.value:
    from absl import logging  # noqa: PLC0415
    from diloco_jax import mesh  # noqa: PLC0415
    mesh.set_cpu_device_count(2)   # M=2 workers, one device each
    logging.set_verbosity(logging.WARNING)
    from diloco_jax.config import ConfigError  # noqa: PLC0415
    try:
      run_all(_OUT.value, _DATA.value, _STEPS.value, _ONLY.value, archive, _LONG_SET.value)
    except ConfigError as e:
      print(f"config error: {e}", file=sys.stderr)
      return 2
  elif archive:
    archive_lib.restore(archive, _OUT.value)
  if not write_report(_OUT.value, _DOCS.value):
    print(f"needle: no finished run of {', '.join(EVALUATED)} under {_OUT.value} (nor in the "
          f"archive): no report written.", file=sys.stderr)
    return 1
  print(f"wrote {os.path.join(_DOCS.value, 'needle.md')}")
  return 0


if __name__ == "__main__":
  app.run(main)
