"""The MoE against its dense twin, under data-parallel and Streaming DiLoCo, and the report.

Runs (experiments/configs/moe.py, byte-level english-pd, equal tokens for every run):

  dense_dp, moe_dp                  data-parallel, M=2 workers' batches averaged every step
  dense_streaming, moe_streaming    Streaming DiLoCo M=2, H=30, τ=1, α=0.5, E3M0
  moe_streaming_router10            the same with diloco.router_sync_every=10 (routers as their
                                    own fragment, synced 3× as often as the experts)
  moe_capacity_dp_T150, moe_dropless_dp_T150
                                    the capacity and dropless (ragged_dot) paths, short runs
                                    back to back for their speed

The MoE has E=8 experts, top-2, per-expert hidden size F/2, so a token's two experts hold the
dense MLP's parameters (equal active parameters). Each run trains in its own workdir under
--out; a run whose summary.json exists is skipped, so an interrupted suite resumes. The report
(docs/results/moe.md and moe_curves.png) is rebuilt from the workdirs; `--report` only does that.

  python experiments/moe.py --out=runs/moe
  python experiments/moe.py --out=runs/moe --report
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUT = flags.DEFINE_string("out", "runs/moe", "root of the run workdirs")
_DOCS = flags.DEFINE_string("docs", os.path.join(REPO, "docs", "results"),
                            "where moe.md and moe_curves.png go")
_DATA = flags.DEFINE_string("data", os.path.join(REPO, "..", "shared", "data", "english-pd",
                                                 "*.txt"), "text files (glob) to train on")
_STEPS = flags.DEFINE_integer("steps", 600, "inner steps T of the main runs")
_REPORT = flags.DEFINE_bool("report", False, "only rebuild the report from --out")
_ONLY = flags.DEFINE_list("only", [], "run only these runs")
_SEEDS = flags.DEFINE_integer("seeds", 2, "seeds 0 .. N-1 of every main run (the dropless "
                              "speed run: seed 0 only); the tables show means")

# name -> (config argument, algorithm, overrides, steps; 0: --steps)
RUNS = {
    "dense_dp": ("tiny_dense", "dp", {}, 0),
    "moe_dp": ("tiny", "dp", {}, 0),
    "dense_streaming": ("tiny_dense", "streaming", {}, 0),
    "moe_streaming": ("tiny", "streaming", {}, 0),
    "moe_streaming_router10": ("tiny", "streaming", {"diloco.router_sync_every": 10}, 0),
    "moe_capacity_dp_T150": ("tiny", "dp", {}, 150),
    "moe_dropless_dp_T150": ("tiny", "dp", {"model.moe.dispatch": "dropless"}, 150),
}
CAPACITY_TWIN = "moe_capacity_dp_T150"   # run back to back with the dropless one: their speeds


def _family():
  spec = importlib.util.spec_from_file_location(
      "moe_family", os.path.join(REPO, "experiments", "configs", "moe.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def workdir_name(name: str, seed: int) -> str:
  return name if seed == 0 else f"{name}_seed{seed}"


def seeds_of(name: str, seeds: int) -> range:
  return range(1) if RUNS[name][3] else range(seeds)


def make_config(name: str, data_glob: str, steps: int, seed: int = 0):
  arg, algorithm, overrides, run_steps = RUNS[name]
  c = _family().get_config(arg)
  c.algorithm = algorithm
  c.seed = seed
  c.data.paths = (data_glob,)
  c.train.num_steps = run_steps or steps
  c.eval.every_steps = max(c.train.num_steps // 10, 1)
  c.checkpoint.every_steps = 0
  for key, value in overrides.items():
    section, field = key.split(".", 1)
    node = c[section]
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def run_all(out: str, data_glob: str, steps: int, seeds: int, only=(), log=print) -> None:
  from diloco_jax import config as config_lib, train  # noqa: PLC0415  (after devices are set)
  # Seed-major: every run's seed 0 first, so a cut-short suite still has one full table.
  todo = [(n, seed) for seed in range(seeds) for n in RUNS
          if (not only or n in only) and seed in seeds_of(n, seeds)]
  for n, seed in todo:   # every config error before the first run trains
    config_lib.from_config_dict(make_config(n, data_glob, steps, seed))
  for i, (n, seed) in enumerate(todo):
    name = workdir_name(n, seed)
    wd = os.path.join(out, name)
    if os.path.exists(os.path.join(wd, "summary.json")):
      log(f"[{i + 1}/{len(todo)}] {name}: done, skipped")
      continue
    t0 = time.perf_counter()
    s = train.run(make_config(n, data_glob, steps, seed), wd)
    log(f"[{i + 1}/{len(todo)}] {name}: eval loss {s['final_eval_loss']:.4f}, "
        f"{time.perf_counter() - t0:.0f} s")


# ------------------------------------------------------------------------------------ report
def load(out: str, name: str):
  wd = os.path.join(out, name)
  try:
    with open(os.path.join(wd, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
  except FileNotFoundError:
    return None
  with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {"summary": summary, "rows": rows}


def _late(rows, key, frac=0.5):
  """Mean of `key` over the rows of the last `frac` of training (the router settles early)."""
  last = rows[-1]["step"]
  vals = [r[key] for r in rows if key in r and r["step"] > (1 - frac) * last and r[key] is not None]
  return statistics.mean(vals) if vals else None


def _speed(rows):
  """Median tokens/s over the logged intervals after the first two (compilation excluded)."""
  vals = [r["tokens_per_s"] for r in rows[2:]]
  return statistics.median(vals) if vals else None


def write_report(out: str, docs: str, steps: int, seeds: int = 2) -> list[str]:
  done = {}
  for n in RUNS:
    got = [r for r in (load(out, workdir_name(n, s)) for s in seeds_of(n, seeds)) if r]
    if got:
      done[n] = got
  if not done:
    return []
  E = 8
  target_entropy = 0.9 * math.log(E)
  finals = {n: [r["summary"]["final_eval_loss"] for r in rs] for n, rs in done.items()}
  loss = {n: statistics.mean(v) for n, v in finals.items()}
  mean_of = lambda rs, key: (None if any(_late(r["rows"], key) is None for r in rs)
                             else statistics.mean(_late(r["rows"], key) for r in rs))

  def loss_cell(n):
    v = finals[n]
    if len(v) == 1:
      return f"{v[0]:.4f}"
    return f"{loss[n]:.4f} ± {statistics.stdev(v):.4f} ({', '.join(f'{x:.4f}' for x in v)})"
  lines = ["# Sparse mixture-of-experts vs dense, data-parallel and Streaming DiLoCo",
           "",
           "Written by `python experiments/moe.py --out=runs/moe` (runs, then this report) on "
           "2 CPU cores; byte-level english-pd, held-out loss in nats/byte on the outer copy "
           "θ_g (Streaming DiLoCo) or the one model (data-parallel), at the eval capacity "
           "factor 2.0. Models: `experiments/configs/moe.py:tiny` (E=8, top-2, every block, "
           "per-expert hidden 128) and `:tiny_dense` (hidden 256): the same attention, "
           "embeddings and active FFN parameters. M=2, H=30, τ=1, α=0.5, E3M0, "
           f"{steps} steps of 2×8×64 bytes (data-parallel: the same 1024 bytes per step); "
           f"eval loss: mean ± std over seeds 0..{seeds - 1} (each seed's value in brackets), "
           "the other columns: means over seeds.",
           "",
           "| run | params (active) | eval loss | load entropy | max/mean load | dropped | "
           "dead experts | router overlap | router distance | tokens/s | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f: "–" if v is None else format(v, f)
  for n, rs in done.items():
    s = rs[0]["summary"]
    lines.append(
        f"| {n} | {s['num_params']:,} ({s.get('active_params', s['num_params']):,}) | "
        f"{loss_cell(n)} | {fmt(mean_of(rs, 'moe/load_entropy'), '.3f')} | "
        f"{fmt(mean_of(rs, 'moe/max_load'), '.2f')} | "
        f"{fmt(mean_of(rs, 'moe/dropped_fraction'), '.2%')} | "
        f"{fmt(mean_of(rs, 'moe/dead_experts'), '.2f')} | "
        f"{fmt(mean_of(rs, 'router/topk_overlap'), '.3f')} | "
        f"{fmt(mean_of(rs, 'router/distance'), '.3f')} | "
        f"{fmt(max(_speed(r['rows']) for r in rs), '.0f')} | "
        f"{min(r['summary']['wall_time_s'] for r in rs):.0f} |")
  lines += ["", "Load entropy, max/mean load, dropped fraction and dead experts (load below "
            "1/(10E)) are the training batches' values averaged over the MoE blocks and over "
            "the second half of training; router overlap (top-2 sets shared by the two "
            "workers on the same 32×64 held-out bytes) and distance (‖W₁ − W₂‖/mean ‖W‖) are "
            "measured on the workers' parameters entering each step whose sync carries the "
            "routers (one inner step before that sync), averaged over the second half. tokens/s: median over logged intervals after the first two "
            "(compilation excluded), the best seed's (the machine was shared with other work "
            "during some runs); wall: the shortest seed's, compilation included.", "",
            "## Targets", ""]

  def check(label, ok, detail):
    mark = "–" if ok is None else ("met" if ok else "**not met**")
    lines.append(f"- {label}: {mark} ({detail})")

  for algo in ("dp", "streaming"):
    a, b = loss.get(f"moe_{algo}"), loss.get(f"dense_{algo}")
    check(f"MoE below dense by ≥ 0.02 nats/byte ({algo})",
          None if a is None or b is None else b - a >= 0.02,
          "–" if a is None or b is None else f"dense {b:.4f} − MoE {a:.4f} = {b - a:+.4f}")
  for n in ("moe_dp", "moe_streaming"):
    if n in done:
      h = mean_of(done[n], "moe/load_entropy")
      check(f"load entropy ≥ 0.9·ln 8 = {target_entropy:.3f} ({n})", h >= target_entropy,
            f"{h:.3f}")
      d = mean_of(done[n], "moe/dropped_fraction")
      check(f"≤ 2 % dropped at capacity 1.25 ({n})", d <= 0.02, f"{d:.2%}")
  if all(k in loss for k in ("moe_dp", "moe_streaming", "dense_dp", "dense_streaming")):
    g_moe = loss["moe_streaming"] - loss["moe_dp"]
    g_dense = loss["dense_streaming"] - loss["dense_dp"]
    ok = g_moe <= 1.5 * g_dense if g_dense > 0 else g_moe <= 0
    check("MoE Streaming-DiLoCo-vs-DP gap within 1.5× the dense gap", ok,
          f"MoE {g_moe:+.4f}, dense {g_dense:+.4f} nats/byte")
  if "moe_streaming_router10" in done and "moe_streaming" in done:
    tiny = _family().get_config("tiny").model
    router_params = tiny.num_layers * tiny.d_model * tiny.moe.num_experts
    d = loss["moe_streaming_router10"] - loss["moe_streaming"]
    paired = [a - b for a, b in zip(finals["moe_streaming_router10"], finals["moe_streaming"])]
    lines += ["", "## Routers synced more often", "",
              f"`diloco.router_sync_every=10` (routers every 10 steps, experts every 30): eval "
              f"loss {loss['moe_streaming_router10']:.4f} vs {loss['moe_streaming']:.4f} "
              f"({d:+.4f}), means over {len(paired)} seed(s); per seed (same data order and "
              f"init): {', '.join(f'{x:+.4f}' for x in paired)}. The router distance between "
              f"the workers at their syncs halves "
              f"({fmt(mean_of(done['moe_streaming'], 'router/distance'), '.3f')} → "
              f"{fmt(mean_of(done['moe_streaming_router10'], 'router/distance'), '.3f')}); "
              f"the extra bits: the routers' {router_params:,} parameters "
              f"({router_params / done['moe_streaming'][0]['summary']['num_params']:.2%} of "
              f"the model) sent three times per H instead of once."]
  if "moe_dropless_dp_T150" in done and CAPACITY_TWIN in done:
    fast = _speed(done[CAPACITY_TWIN][0]["rows"])
    slow = _speed(done["moe_dropless_dp_T150"][0]["rows"])
    lines += ["", "## Dropless vs capacity on XLA:CPU", "",
              f"Data-parallel MoE, tokens/s (median, compilation excluded): capacity "
              f"{fast:.0f}, dropless (`ragged_dot`) {slow:.0f}: {fast / slow:.2f}× in favour of "
              f"the capacity path. XLA:CPU lowers `ragged_dot` densely (every row times every "
              f"expert), so the dropless path pays E=8 experts' FLOPs for k=2; the capacity path "
              f"pays E·C = k·T·1.25 rows plus a scatter and a gather of the T·k assignments."]
  files = []
  os.makedirs(docs, exist_ok=True)
  try:
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n, rs in done.items():
      pts = [(row["tokens_seen"], row["eval_loss"]) for row in rs[0]["rows"]
             if row.get("eval_loss") is not None]
      ax.plot(*zip(*pts), marker="o", ms=3, label=n,
              ls="-" if n.startswith("moe") else "--")
    ax.set_xlabel("training bytes")
    ax.set_ylabel("held-out loss (nats/byte), seed 0")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.join(docs, "moe_curves.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    files.append(png)
    lines += ["", "![held-out loss curves](moe_curves.png)"]
  except ImportError:
    pass
  md = os.path.join(docs, "moe.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return [md, *files]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _REPORT.value:
    from absl import logging  # noqa: PLC0415
    from diloco_jax import mesh  # noqa: PLC0415
    mesh.set_cpu_device_count(2)   # M=2 workers, one device each
    logging.set_verbosity(logging.WARNING)
    from diloco_jax.config import ConfigError  # noqa: PLC0415
    try:
      run_all(_OUT.value, _DATA.value, _STEPS.value, _SEEDS.value, _ONLY.value,
              log=lambda m: print(m, flush=True))
    except ConfigError as e:
      print(f"config error: {e}", file=sys.stderr)
      return 2
  for path in write_report(_OUT.value, _DOCS.value, _STEPS.value, _SEEDS.value):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  app.run(main)
