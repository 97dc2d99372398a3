"""Compute utilization against WAN bandwidth for DP, DiLoCo and Streaming DiLoCo.

The simulator of the Streaming DiLoCo paper (arXiv 2501.18512, §3.1 and its appendix): one inner
step of one worker is a DAG with one node per layer l = 1..L for the forward pass (F_l), the
backward pass to the activations (BA_l), the backward pass to the parameters (BP_l) and the
reduction of that layer's gradient or outer gradient over the workers (R_l): 4L−1 nodes, as the
first layer needs no activation gradient. Only the WAN between workers is modelled. The output is
the bandwidth a method needs to reach a compute utilization (compute time / wall-clock time).

How the DAG is evaluated (a discrete-event list schedule; exact for this DAG, no lookup table):

* Edges: F_l → F_{l+1}; F_L → BA_L, BP_L; BA_{l+1} → BA_l, BP_l; BP_l → R_l; and, across steps,
  R_l issued after step t → F_l of step t+τ+1 (the merge happens after step t+τ).
* Resources: the accelerator runs the 3L−1 compute nodes one at a time in `compute_order` (F_1..F_L,
  then BP_L, BA_L, …, BP_2, BA_2, BP_1: BP first so the layer's reduction starts as early as
  possible); the WAN link runs reductions one at a time, first in first out. Workers are
  identical, so one worker's schedule is everyone's.
* Methods: dp is H=1 with all layers reduced every step; diloco reduces all layers every H steps;
  streaming reduces F = L / layers_per_fragment strided fragments, fragment p at the steps t with
  (t − p·⌊H/F⌋) mod H = 0 (SPEC §2); τ=0 for these three, τ≥1 for streaming_overlap and
  streaming_overlap_fp4 (which also sends fewer bits).
* Measurement: the schedule repeats every H steps; we simulate periods until one takes as long as
  the one before (the second, for the paper's settings) and report H · step_time over that wall
  time, so a sync's cost is amortised over the H steps it serves. A step costs a few numpy ops
  over all bandwidths at once, using the max-plus identity
  end_k = max(end_{k−1}, ready_k) + d_k = D_k + max_{j≤k}(ready_j − D_{j−1}) (D = cumulative
  durations); the 100B model (108 layers) takes a fraction of a second.

Choices the paper leaves open (ours; `docs/results/netsim.md` has the evidence):

* Parameters: N is the nominal size (1B → 1e9, 10B → 1e10, 100B → 1e11), spread evenly over the L
  layers (no embedding node). The paper's 1B table implies N·bits ≈ 1.35e10 bits per full sync
  (≈ 0.85e9 bf16 values): with N = 1e9 our bandwidths are one grid step (21 %) above the
  paper's in 17 of 25 cells, with N = 0.86e9 they match in 23. The model package's 1B preset (1.275e9)
  would put cells two or three steps too high.
* Bits per value: 16 (bf16) for dp, diloco, streaming and streaming_overlap; 4 for
  streaming_overlap_fp4 (no per-block scales). 32 bits would double the unquantized rows and make
  the FP4 row 8× cheaper instead of the paper's ~4×.
* All-reduce: a ring over M=2 workers; each worker sends 2(M−1)/M of the payload (1× at M=2).
* Latency: a reduction completes 2(M−1)·latency after its last bit is sent (one one-way delay per
  ring phase) and does not hold the link, so back-to-back reductions pipeline. Default 0: the
  paper's dp reaches 99 % at 569 Gbit/s, which leaves ~1 ms for the last layer's reduction, so its
  simulator cannot have charged a WAN-scale latency per reduction.
* Compute split: F_l, BA_l and BP_l each cost 2·(layer params) FLOPs per token, so each takes
  c = step_time / (3L − 1). The step time is given (0.1 / 0.8 / 4.9 s, the paper's values) or is
  FLOPs / (peak FLOP/s · MFU); the paper says 40 % MFU in its text and 60 % in a table caption
  (we default to 60 %; it does not matter when the step time is given).
* Overlap: with τ=0 a reduction hides only behind the rest of its own step's backward pass; each
  extra step of τ hides it behind one more whole step; a fragment's reduction waits on the link
  behind earlier ones.
* Grid: bandwidths `numpy.logspace(-1, 3, 50)` Gbit/s; the reported value is the smallest grid
  value reaching the target, rounded to 0.1 (None when none does).

Command line:

  python -m diloco_jax.netsim --preset=1B                 # Gbit/s per method and target
  python -m diloco_jax.netsim --preset=1B --json          # the same, one JSON object
  python -m diloco_jax.netsim --preset=10B --plot=u.png   # utilization against bandwidth
  python -m diloco_jax.netsim --num_layers=32 --num_params=7e9 --flops_per_step=1e17 \\
      --peak_flops=4e17 --mfu=0.4 --bandwidth=10,100       # your own model; utilization at 10/100
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import numpy as np

METHODS = ("dp", "diloco", "streaming", "streaming_overlap", "streaming_overlap_fp4")
LABELS = {"dp": "Data-parallel", "diloco": "DiLoCo", "streaming": "Streaming DiLoCo",
          "streaming_overlap": "+ overlapped communication",
          "streaming_overlap_fp4": "+ overlapped FP4 communication"}
TARGETS = (0.5, 0.8, 0.9, 0.95, 0.99)
PATTERNS = ("strided", "sequential")
GRID_GBPS = np.logspace(-1, 3, 50)  # the paper's bandwidth grid, Gbit/s


def _check_int(name: str, value, minimum: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value, unit: str = "") -> None:
  ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
  if not ok or not 0 < value < math.inf:
    raise ValueError(f"{name} must be a finite number > 0{' ' + unit if unit else ''}, "
                     f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one worker computes per inner step.

  Attributes:
    num_layers: L, transformer blocks (one column of the DAG each).
    num_params: N, values in one full sync, spread evenly over the L layers.
    step_time: seconds of pure compute per inner step (all 3L−1 compute nodes).
  """

  num_layers: int
  num_params: float
  step_time: float

  def __post_init__(self):
    _check_int("num_layers", self.num_layers, 1)
    _check_positive("num_params", self.num_params)
    _check_positive("step_time", self.step_time, "seconds")


@dataclasses.dataclass(frozen=True)
class Method:
  """When and how much the workers communicate.

  Attributes:
    name: a label (one of METHODS for the paper's methods); the fields below set the behaviour.
    inner_steps: H, steps between two syncs of the same layer (1 for data-parallel).
    layers_per_fragment: layers reduced together; None for one fragment of all layers.
    tau: τ, whole steps a reduction may overlap before its result is merged (τ < H).
    bits: bits per value on the wire.
    pattern: "strided" (fragment j holds layers j, j+F, …; the paper's default) or "sequential".
  """

  name: str
  inner_steps: int
  layers_per_fragment: int | None
  tau: int
  bits: float
  pattern: str = "strided"

  def __post_init__(self):
    _check_int("inner_steps", self.inner_steps, 1)
    if self.layers_per_fragment is not None:
      _check_int("layers_per_fragment", self.layers_per_fragment, 1)
    _check_int("tau", self.tau, 0)
    if self.tau >= self.inner_steps:
      raise ValueError(f"tau must be smaller than inner_steps (H={self.inner_steps}), "
                       f"got {self.tau}")
    _check_positive("bits", self.bits)
    if self.pattern not in PATTERNS:
      raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")


def method(name: str, *, inner_steps: int = 100, layers_per_fragment: int = 3, tau: int = 1,
           bits: float = 16, quantized_bits: float = 4, pattern: str = "strided") -> Method:
  """The paper's method `name` with H, fragment size, τ and bits applied where they belong.

  Args:
    name: one of METHODS.
    inner_steps: H of every method but dp (which syncs every step).
    layers_per_fragment: fragment size of the three streaming methods.
    tau: τ of streaming_overlap and streaming_overlap_fp4 (the others block: τ=0).
    bits: bits per value of dp, diloco, streaming and streaming_overlap.
    quantized_bits: bits per value of streaming_overlap_fp4.
    pattern: fragment pattern of the streaming methods.
  """
  if name not in METHODS:
    raise ValueError(f"methods must be among {', '.join(METHODS)}, got {name!r}")
  _check_positive("bits", bits)
  _check_positive("quantized_bits", quantized_bits)
  if name == "dp":
    return Method(name, 1, None, 0, bits, pattern)
  if name == "diloco":
    return Method(name, inner_steps, None, 0, bits, pattern)
  if name == "streaming":
    return Method(name, inner_steps, layers_per_fragment, 0, bits, pattern)
  if name == "streaming_overlap":
    return Method(name, inner_steps, layers_per_fragment, tau, bits, pattern)
  return Method(name, inner_steps, layers_per_fragment, tau, quantized_bits, pattern)


PRESETS = {  # the paper's simulated models: L, nominal N, step time in seconds
    "1B": Workload(24, 1e9, 0.1),
    "10B": Workload(48, 1e10, 0.8),
    "100B": Workload(108, 1e11, 4.9),
}


def step_time_from_flops(flops_per_step: float, peak_flops: float, mfu: float) -> float:
  """Seconds of compute per inner step: FLOPs / (peak FLOP/s · MFU).

  Args:
    flops_per_step: FLOPs of one inner step of one worker (≈ 6 · N · tokens per step).
    peak_flops: the worker's peak FLOP/s, all its accelerators together.
    mfu: model FLOPs utilization in (0, 1].
  """
  _check_positive("flops_per_step", flops_per_step)
  _check_positive("peak_flops", peak_flops)
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu must lie in (0, 1], got {mfu!r}")
  return flops_per_step / (peak_flops * mfu)


def compute_order(num_layers: int) -> list[tuple[str, int]]:
  """The 3L−1 compute nodes of one step, (kind, layer 1..L), in the order the accelerator runs them.

  The L reduction nodes R_l (one per BP_l) run on the link, so a step has 4L−1 nodes.
  """
  L = num_layers
  backward = [node for l in range(L, 1, -1) for node in (("BP", l), ("BA", l))] + [("BP", 1)]
  return [("F", l) for l in range(1, L + 1)] + backward


def fragment_layers(num_layers: int, layers_per_fragment: int | None,
                    pattern: str = "strided") -> list[list[int]]:
  """Layers (1..L) of each fragment; F = ceil(L / layers_per_fragment) fragments (1 for None)."""
  L = num_layers
  k = L if layers_per_fragment is None else min(layers_per_fragment, L)
  F = math.ceil(L / k)
  if pattern == "strided":
    return [list(range(j + 1, L + 1, F)) for j in range(F)]
  return [list(range(j * k + 1, min(L, (j + 1) * k) + 1)) for j in range(F)]


def simulate(workload: Workload, meth: Method, bandwidth_gbps, *, latency: float = 0.0,
             num_workers: int = 2, max_periods: int = 64) -> np.ndarray:
  """Steady-state compute utilization (compute time / wall time) at each bandwidth.

  Args:
    workload: the model and its step time.
    meth: the method (see `method`).
    bandwidth_gbps: a WAN bandwidth per worker in Gbit/s, or an array of them; > 0, inf allowed.
    latency: one-way WAN latency in seconds, >= 0.
    num_workers: M >= 2; the ring all-reduce sends 2(M−1)/M of the payload per worker.
    max_periods: at most this many periods of H steps are simulated; the last one is measured
      once its wall time equals the previous one's (two periods for the paper's settings).

  Returns:
    Utilizations in (0, 1], with the shape of `bandwidth_gbps`.
  """
  bw = np.asarray(bandwidth_gbps, dtype=np.float64)
  if bw.size == 0 or np.any(np.isnan(bw)) or np.any(bw <= 0):
    raise ValueError(f"bandwidth must be > 0 Gbit/s, got {bandwidth_gbps!r}")
  if not isinstance(latency, (int, float)) or not 0 <= latency < math.inf:
    raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
  _check_int("num_workers", num_workers, 2)
  _check_int("max_periods", max_periods, 2)
  shape, bw = bw.shape, bw.reshape(-1)

  L, H, tau = workload.num_layers, meth.inner_steps, meth.tau
  c = workload.step_time / (3 * L - 1)  # F, BA and BP of a layer cost the same FLOPs
  order = compute_order(L)
  # When F_l and BP_l end, counted from the start of F_1 (index l-1), if nothing stalls.
  f_start = np.array([order.index(("F", l)) for l in range(1, L + 1)]) * c
  bp_end = (np.array([order.index(("BP", l)) for l in range(1, L + 1)]) + 1) * c
  fragments = fragment_layers(L, meth.layers_per_fragment, meth.pattern)
  offsets = [p * (H // len(fragments)) for p in range(len(fragments))]
  # Seconds one worker spends sending one layer's share of the ring all-reduce.
  send = 2 * (num_workers - 1) / num_workers * workload.num_params / L * meth.bits / (bw * 1e9)
  arrive = 2 * (num_workers - 1) * latency

  accel = np.zeros_like(bw)  # when the accelerator is next free
  link = np.zeros_like(bw)  # when the WAN link is next free
  merges: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # step -> (layers, done [k, B])
  walls = []  # wall time of each period of H steps, [B] each
  for period in range(max_periods):
    period_start = accel
    for t in range(period * H + 1, (period + 1) * H + 1):
      # F_l of this step may not start before layer l's merge: start F_1 late enough for all.
      start = accel
      for layers, done in merges.pop(t, ()):
        start = np.maximum(start, np.max(done - f_start[layers - 1, None], axis=0))
      accel = start + len(order) * c
      due = [lay for p, lay in enumerate(fragments) if (t - offsets[p]) % H == 0]
      if not due:
        continue
      # This step's reductions in the order their BP nodes end (top layer first), FIFO on the link.
      layers = np.array(sorted((l for lay in due for l in lay), key=lambda l: bp_end[l - 1]))
      ready = start[None, :] + bp_end[layers - 1, None]  # [k, B]
      k = np.arange(1, len(layers) + 1)[:, None]
      lead = np.maximum.accumulate(ready - (k - 1) * send[None, :], axis=0)
      ends = k * send[None, :] + np.maximum(link[None, :], lead)
      link = ends[-1]
      merges.setdefault(t + tau + 1, []).append((layers, ends + arrive))
    walls.append(accel - period_start)
    # Steady state: the period's wall time repeats (max-plus systems become periodic). With large
    # τ and a slow link the backlog can take many periods to settle; then average the late ones.
    if period and np.allclose(walls[-1], walls[-2], rtol=1e-9, atol=0):
      wall = walls[-1]
      break
  else:
    wall = np.mean(walls[max_periods // 2:], axis=0)
  return (H * workload.step_time / wall).reshape(shape)


def required_bandwidth(utilization: np.ndarray, targets: Sequence[float] = TARGETS,
                       grid: np.ndarray = GRID_GBPS) -> dict[float, float | None]:
  """The smallest grid bandwidth (Gbit/s, rounded to 0.1) whose utilization reaches each target.

  Args:
    utilization: utilization at each grid point (non-decreasing in bandwidth).
    targets: utilizations in (0, 1].
    grid: the bandwidths, ascending.

  Returns:
    target -> Gbit/s, or None when no grid bandwidth reaches the target.
  """
  out = {}
  for u in targets:
    hits = np.nonzero(utilization >= u - 1e-12)[0]  # tolerance: u = 1 at infinite bandwidth
    out[u] = round(float(grid[hits[0]]), 1) if hits.size else None
  return out


def bandwidth_table(workload: Workload, methods: Sequence[Method], *,
                    targets: Sequence[float] = TARGETS, latency: float = 0.0,
                    num_workers: int = 2) -> dict[str, dict[float, float | None]]:
  """Gbit/s each method needs for each target utilization, on the paper's grid."""
  for u in targets:
    if not 0 < u <= 1:
      raise ValueError(f"targets must be utilizations in (0, 100] %, got {u * 100:g}")
  return {m.name: required_bandwidth(simulate(workload, m, GRID_GBPS, latency=latency,
                                              num_workers=num_workers), targets)
          for m in methods}


# ----------------------------------------------------------------------------------------------
# Command line. Library errors start with the argument's name, which is also the flag's name, so
# the CLI turns them into "--name ..." sentences.


def _define_flags() -> None:
  """Defines the CLI's flags; only when run as a program, so importing stays flag-free."""
  from absl import flags  # noqa: PLC0415  (the library above needs numpy only)

  flags.DEFINE_string("preset", "1B", f"Paper model: {', '.join(PRESETS)}.")
  flags.DEFINE_alias("model", "preset")
  flags.DEFINE_integer("num_layers", None, "L; overrides the preset.")
  flags.DEFINE_float("num_params", None, "N, values per full sync; overrides the preset.")
  flags.DEFINE_float("step_time", None, "Seconds of compute per inner step; overrides the preset.")
  flags.DEFINE_float("flops_per_step", None, "FLOPs per inner step per worker: with --peak_flops "
                     "and --mfu, sets the step time instead of --step_time.")
  flags.DEFINE_float("peak_flops", None, "Peak FLOP/s of one worker (with --flops_per_step).")
  flags.DEFINE_float("mfu", 0.6, "Model FLOPs utilization (with --flops_per_step).")
  flags.DEFINE_float("latency", 0.0, "One-way WAN latency, seconds.")
  flags.DEFINE_integer("num_workers", 2, "M, workers in the ring all-reduce.")
  flags.DEFINE_integer("inner_steps", 100, "H (not dp, which syncs every step).")
  flags.DEFINE_integer("layers_per_fragment", 3, "Layers per fragment (streaming methods).")
  flags.DEFINE_integer("tau", 1, "τ, overlap steps (overlapped methods).")
  flags.DEFINE_float("bits", 16, "Bits per value (dp, diloco, streaming, streaming_overlap).")
  flags.DEFINE_float("quantized_bits", 4, "Bits per value of streaming_overlap_fp4.")
  flags.DEFINE_string("pattern", "strided", f"Fragment pattern: {', '.join(PATTERNS)}.")
  flags.DEFINE_list("methods", list(METHODS), f"Methods, among {', '.join(METHODS)}.")
  flags.DEFINE_list("targets", ["50", "80", "90", "95", "99"], "Target utilizations, %.")
  flags.DEFINE_list("bandwidth", [], "Also print the utilization at these Gbit/s (text only).")
  flags.DEFINE_string("plot", None, "Write utilization against bandwidth to this PNG file.")
  flags.DEFINE_bool("json", False, "Print one JSON object: method -> {target %: Gbit/s}.")


def _floats(name: str, values: Sequence[str]) -> list[float]:
  try:
    return [float(v) for v in values]
  except ValueError:
    raise ValueError(f"{name} must be a comma-separated list of numbers, got "
                     f"{','.join(values)!r}") from None


def _setup(FLAGS) -> tuple[str, Workload, list[Method], list[float], list[float]]:
  """Flags -> (model name, workload, methods, targets in (0, 1], bandwidths); ValueError if bad."""
  if FLAGS.preset not in PRESETS:
    raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {FLAGS.preset!r}")
  base = PRESETS[FLAGS.preset]
  step_time = FLAGS.step_time
  if FLAGS.flops_per_step is not None or FLAGS.peak_flops is not None:
    if step_time is not None:
      raise ValueError("step_time cannot be combined with --flops_per_step/--peak_flops: "
                       "give the step time or the FLOPs, not both")
    if FLAGS.flops_per_step is None or FLAGS.peak_flops is None:
      raise ValueError("flops_per_step and --peak_flops must be given together")
    step_time = step_time_from_flops(FLAGS.flops_per_step, FLAGS.peak_flops, FLAGS.mfu)
  workload = Workload(
      num_layers=base.num_layers if FLAGS.num_layers is None else FLAGS.num_layers,
      num_params=base.num_params if FLAGS.num_params is None else FLAGS.num_params,
      step_time=base.step_time if step_time is None else step_time)
  custom = any(v is not None for v in (FLAGS.num_layers, FLAGS.num_params, step_time))
  name = f"custom (from {FLAGS.preset})" if custom else FLAGS.preset
  if not FLAGS.methods:
    raise ValueError(f"methods must name at least one of {', '.join(METHODS)}")
  methods = [method(m, inner_steps=FLAGS.inner_steps,
                    layers_per_fragment=FLAGS.layers_per_fragment, tau=FLAGS.tau,
                    bits=FLAGS.bits, quantized_bits=FLAGS.quantized_bits, pattern=FLAGS.pattern)
             for m in FLAGS.methods]
  targets = _floats("targets", FLAGS.targets)
  if not targets or any(not 0 < u <= 100 for u in targets):
    raise ValueError(f"targets must be percentages in (0, 100], got {','.join(FLAGS.targets)!r}")
  bandwidths = _floats("bandwidth", FLAGS.bandwidth)
  if any(not b > 0 for b in bandwidths):
    raise ValueError(f"bandwidth must be > 0 Gbit/s, got {','.join(FLAGS.bandwidth)!r}")
  # Validated here rather than deep in `simulate`, so a bad value fails before any work.
  if not 0 <= FLAGS.latency < math.inf:
    raise ValueError(f"latency must be a finite number of seconds >= 0, got {FLAGS.latency!r}")
  _check_int("num_workers", FLAGS.num_workers, 2)
  return name, workload, methods, [u / 100 for u in targets], bandwidths


def _key(u: float) -> str:
  return f"{u * 100:g}"


def _format_table(name: str, workload: Workload, methods: Sequence[Method],
                  table: dict[str, dict[float, float | None]], FLAGS) -> str:
  targets = list(next(iter(table.values())))
  lines = [
      f"model {name}: L={workload.num_layers}, N={workload.num_params:.4g}, "
      f"step {workload.step_time:g} s; H={FLAGS.inner_steps}, "
      f"{FLAGS.layers_per_fragment} layers/fragment ({FLAGS.pattern}), tau={FLAGS.tau}, "
      f"bits {FLAGS.bits:g}/{FLAGS.quantized_bits:g}, M={FLAGS.num_workers}, "
      f"latency {FLAGS.latency:g} s",
      "Gbit/s needed for each compute utilization (smallest value of numpy.logspace(-1, 3, 50)):",
      f"{'method':<32}" + "".join(f"{_key(u) + ' %':>9}" for u in targets),
  ]
  for m in methods:
    cells = table[m.name]
    lines.append(f"{LABELS[m.name]:<32}" + "".join(
        f"{'>1000' if cells[u] is None else f'{cells[u]:.1f}':>9}" for u in targets))
  return "\n".join(lines)


def _plot(path: str, name: str, workload: Workload, methods: Sequence[Method], targets,
          latency: float, num_workers: int) -> None:
  import matplotlib  # noqa: PLC0415  (only the CLI's --plot needs it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  bw = np.logspace(-1, 3, 400)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for m in methods:
    u = simulate(workload, m, bw, latency=latency, num_workers=num_workers)
    ax.plot(bw, 100 * u, label=LABELS[m.name])
  for u in targets:
    ax.axhline(100 * u, color="grey", lw=0.5, ls=":")
  ax.set_xscale("log")
  ax.set_xlabel("WAN bandwidth per worker (Gbit/s)")
  ax.set_ylabel("compute utilization (%)")
  ax.set_ylim(0, 101)
  ax.set_title(f"{name}: L={workload.num_layers}, N={workload.num_params:.3g}, "
               f"step {workload.step_time:g} s")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> int:
  """The CLI (after `_define_flags` and flag parsing); returns the exit status."""
  from absl import flags  # noqa: PLC0415

  FLAGS = flags.FLAGS
  if len(argv) > 1:
    print(f"netsim: unexpected arguments {list(argv[1:])}; every option is a --flag",
          file=sys.stderr)
    return 2
  try:
    name, workload, methods, targets, bandwidths = _setup(FLAGS)
    table = bandwidth_table(workload, methods, targets=targets, latency=FLAGS.latency,
                            num_workers=FLAGS.num_workers)
  except ValueError as e:
    print(f"netsim: --{e}", file=sys.stderr)
    return 2
  if FLAGS.json:
    print(json.dumps({m: {_key(u): v for u, v in cells.items()} for m, cells in table.items()}))
  else:
    print(_format_table(name, workload, methods, table, FLAGS))
    if bandwidths:
      print("\ncompute utilization (%) at the given bandwidths (Gbit/s):")
      print(f"{'method':<32}" + "".join(f"{b:>9g}" for b in bandwidths))
      for m in methods:
        u = simulate(workload, m, bandwidths, latency=FLAGS.latency, num_workers=FLAGS.num_workers)
        print(f"{LABELS[m.name]:<32}" + "".join(f"{100 * x:>9.1f}" for x in u))
  if FLAGS.plot:
    _plot(FLAGS.plot, name, workload, methods, targets, FLAGS.latency, FLAGS.num_workers)
    if not FLAGS.json:
      print(f"\nplot written to {FLAGS.plot}")
  return 0


def _parse_flags(argv):
  """absl's parser, but a malformed flag is one sentence on stderr and exit status 2."""
  from absl import flags  # noqa: PLC0415

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"netsim: flag error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  _define_flags()
  app.run(main, flags_parser=_parse_flags)
