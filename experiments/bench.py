"""Data-parallel vs DiLoCo vs Streaming DiLoCo on one machine: throughput, compile time, state
memory per device and achieved FLOP/s, all measured in one invocation and printed as ratios.

Run book:
  default (2 CPU cores, the tiny model with 4 blocks; 4 simulated devices for the methods, 8 for
  the layouts section; about 3-4 minutes):
    .venv/bin/python experiments/bench.py
  quick (under a minute; what tests/test_bench.py runs):
    .venv/bin/python experiments/bench.py --quick --json
  without the layouts section (the methods only, on one device per worker):
    .venv/bin/python experiments/bench.py --layouts=false
  the attention section (SPEC §6.2: dense vs blockwise at 1k, 4k, 16k, timed at 4k; about a
  minute more) runs by default; without it:
    .venv/bin/python experiments/bench.py --attention=false
  a paper-size model on an accelerator, e.g. the 35M preset at sequence length 1,024 (the
  layouts section needs 8 devices and reports itself skipped with fewer):
    .venv/bin/python experiments/bench.py --model=35M --num_layers=0 --vocab_size=0 \
        --layers_per_fragment=3 --workers=2 --batch_size=4 --seq_len=1024

  the torchft peer's workload (shared/peers/README.md: 2 blocks, d_model 128, 4 heads, GELU MLP
  512, vocab 256, B = 8, L = 128, M = 4; Streaming DiLoCo with P = 3) against PyTorch's step of
  the same model (docs/cpu_speed.md; about 5 minutes with --repeats=3):
    .venv/bin/python experiments/bench.py --peer --layouts=false --attention=false \
        --torch_python=$TORCH_VENV/bin/python   # any venv with torch and numpy

What it measures (medians over --repeats; the methods' repetitions are interleaved, so a busy
neighbour on a shared machine slows every method alike and the ratios stay meaningful):
  throughput  tokens/s over whole H-step periods (inner steps plus every send, receive and sync
              that falls in the period, through the public `step`), and of the inner-step program
              alone; each as a ratio to data-parallel (goal: Streaming DiLoCo >= 0.95 of DP).
  compile     seconds to lower and to compile each method's programs ahead of time (jax AOT).
  memory      bytes of state every device holds (the addressable shards of each state field),
              and each program's transient memory from the compiled `memory_analysis()`.
  FLOP/s      the inner step's FLOPs per second, counted two ways (XLA's `cost_analysis()` of the
              compiled program, and 6·N·tokens), as a fraction of a dense fp32 matmul's FLOP/s
              measured on the same devices in the same process.
  torch       with torch importable here or a --torch_python: one worker's inner step on one
              device vs experiments/torch_step.py's PyTorch implementation of the same model and
              optimizer at one thread, interleaved: the same loss at the same params is checked
              first, then CPU ms per step and ours / torch (goal <= 1). Without torch, one line
              says it was skipped.
  layouts     Streaming DiLoCo (the streaming method's config, M=2 workers) with each worker
              replicated (mesh.data=1, mesh.model=1: every param P()), FSDP (mesh.data=4) and
              FSDP+TP (mesh.data=2, mesh.model=2), built from RunConfigs by build.make_mesh,
              build.init_params and build.make_algorithm as the trainer builds them; the batch
              rounded up to a multiple of 4 rows per worker, and codec_block_size 16 on every
              row (d_model/4 = 16 values per device under FSDP: a block must not straddle two
              devices). For each: the inner-step program's tokens/s alone (wall and CPU time,
              the layouts' repetitions interleaved), its compile time, the state bytes per
              device by field and the inner step's argument bytes per device (its compiled
              `memory_analysis()`), each as a ratio to replicated.
  attention   one attention layer's forward+backward (q, k, v [1, L, 8, 64] fp32) compiled
              alone at each --attention_lengths: dense (the [L, L] scores) vs blockwise
              (flash-style tiles) and, on GPU / TPU, the cuDNN / splash kernel: the temporaries
              from `memory_analysis()`, and at --attention_timed_length the wall time of each,
              interleaved, as dense's time over it. Only compiled at the other lengths: the
              dense program at 16k needs 16 GiB to run, and XLA plans it without allocating.

On CPU, XLA runs one computation at a time (docs/design.md), so a send cannot overlap the next
inner step here; the throughput ratio shows what the extra programs cost, not the overlap.
Likewise, XLA:CPU's simulated devices share the same 2 cores, so FSDP and TP cannot be faster
here: the layouts' throughput ratios show the cost of the extra collectives (all-gathers and
reduce-scatters inside a worker), and their bytes the memory saving, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags, logging

# Runs from a checkout as `python experiments/bench.py`, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# These imports load jax but do not start its backends, so the device count set in main() holds.
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax.sharding import PartitionSpec as P  # noqa: E402

from diloco_jax import algorithm, build, sharding  # noqa: E402
from diloco_jax import config as config_lib  # noqa: E402
from diloco_jax import mesh as mesh_lib  # noqa: E402
from diloco_jax import model as model_lib  # noqa: E402

_MODEL = flags.DEFINE_string("model", "tiny", "model preset: tiny, or the paper family 35M ... 4B")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "transformer blocks; 0: the preset's")
_VOCAB = flags.DEFINE_integer("vocab_size", 128, "vocabulary of the random tokens; 0: the preset's")
_D_MODEL = flags.DEFINE_integer("d_model", 0, "model width; 0: the preset's")
_HEADS = flags.DEFINE_integer("num_heads", 0, "attention heads; 0: the preset's")
_FFN = flags.DEFINE_integer("ffn_dim", 0, "MLP hidden size; 0: the preset's")
_MLP = flags.DEFINE_string("mlp", "", "'swiglu' or 'gelu'; '': the preset's")
_PEER = flags.DEFINE_bool("peer", False, "the torchft peer's workload (shared/peers/README.md): "
                          "2 blocks, d_model 128, 4 heads, GELU MLP 512, vocab 256, B = 8, "
                          "L = 128, M = 4 (explicit flags win)")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", "", "a Python with torch (e.g. VENV/bin/python): also time "
    "experiments/torch_step.py's PyTorch implementation of the same model and inner step, one "
    "thread, interleaved with ours; '': torch in this Python if importable, else skipped")
_WORKERS = flags.DEFINE_integer("workers", 4, "M, workers (replicas)")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "simulated CPU devices; 0: one per worker")
_BATCH = flags.DEFINE_integer("batch_size", 4, "sequences per worker per step (B)")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "tokens per sequence (L)")
_H = flags.DEFINE_integer("inner_steps", 20, "H, inner steps between two syncs of a fragment")
_LPF = flags.DEFINE_integer("layers_per_fragment", 2, "blocks per Streaming DiLoCo fragment")
_TAU = flags.DEFINE_integer("overlap_steps", 1, "τ, Streaming DiLoCo's overlap steps")
_ALPHA = flags.DEFINE_float("merge_alpha", 0.5, "α, Streaming DiLoCo's merge weight")
_CODEC = flags.DEFINE_string("codec", "fp4_e3m0", "Streaming DiLoCo's outer-gradient codec")
_STEPS = flags.DEFINE_integer("steps", 0, "inner steps per timed repetition, rounded up to whole "
                              "H-step periods for the period measurement; 0: H")
# 5 repetitions gave 0.85 and 15 gave 1.06 for the same ratio on 2 cores: medians need more.
_REPEATS = flags.DEFINE_integer("repeats", 15, "timed repetitions per method (medians reported)")
_MATMUL = flags.DEFINE_integer("matmul_size", 512, "n of the reference n x n fp32 matmul per "
                               "device")
_QUICK = flags.DEFINE_bool("quick", False, "tiny sizes that finish in seconds (explicit flags win)")
_JSON = flags.DEFINE_bool("json", False, "print the report as one JSON object instead of text")
_LAYOUTS = flags.DEFINE_bool("layouts", True, "also time Streaming DiLoCo's inner step with each "
                             "worker replicated, FSDP and FSDP+TP (M=2 on 8 devices)")
_ATTENTION = flags.DEFINE_bool("attention", True, "also measure one attention layer's forward + "
                               "backward, dense vs blockwise: temporaries and time")
_ATTN_LENGTHS = flags.DEFINE_list("attention_lengths", ["1024", "4096", "16384"],
                                  "attention section: sequence lengths whose compiled "
                                  "forward+backward temporaries are reported")
_ATTN_TIMED = flags.DEFINE_integer("attention_timed_length", 4096, "attention section: the "
                                   "length at which dense and blockwise are timed")

# --peer replaces these defaults: the torchft peer's model and batch (the peer's learned positions,
# LayerNorm and biases are not ours; the torch section times the same maths as ours).
PEER = dict(num_layers=2, vocab_size=256, d_model=128, num_heads=4, ffn_dim=512, mlp="gelu",
            workers=4, batch_size=8, seq_len=128, inner_steps=24, layers_per_fragment=1)
# --quick replaces these defaults (a flag given on the command line still wins). The attention
# lengths are two and four tiles: with one tile (L = 128) XLA plans a smaller program than the
# tiled one, which would make a two-point growth check meaningless.
QUICK = dict(num_layers=1, vocab_size=32, workers=2, batch_size=2, seq_len=8, inner_steps=2,
             layers_per_fragment=1, repeats=2, matmul_size=64, attention_lengths=["256", "512"],
             attention_timed_length=256)

METHODS = ("dp", "diloco", "streaming")
GOAL = 0.95   # Streaming DiLoCo's throughput as a fraction of data-parallel's

# The layouts section: Streaming DiLoCo with M=2 workers, each worker's devices split as
# (mesh.data, mesh.model). d_model sharded 4 ways leaves runs of D/4 values per device (16 for
# the tiny model), which a quantization block must not straddle: one block size for every row,
# so the three compute the same thing.
LAYOUTS = {"replicated": (1, 1), "fsdp": (4, 1), "fsdp_tp": (2, 2)}
LAYOUT_WORKERS = 2
LAYOUT_BLOCK_SIZE = 16
LAYOUT_DEVICES = LAYOUT_WORKERS * max(d * m for d, m in LAYOUTS.values())   # 8

# The attention section: one layer's q, k, v [B, L, H, K] in fp32 (SPEC §6.2's measurement),
# blockwise in tiles of ATTN_BLOCK; timed over at most ATTN_REPEATS interleaved repetitions
# (one dense forward+backward at 4k takes seconds on 2 cores).
ATTN_BATCH, ATTN_HEADS, ATTN_HEAD_DIM, ATTN_BLOCK, ATTN_REPEATS = 1, 8, 64, 128, 5


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str
  num_layers: int
  vocab_size: int
  d_model: int
  num_heads: int
  ffn_dim: int
  mlp: str
  workers: int
  cpu_devices: int
  batch_size: int
  seq_len: int
  inner_steps: int
  layers_per_fragment: int
  overlap_steps: int
  merge_alpha: float
  codec: str
  steps: int
  repeats: int
  matmul_size: int
  quick: bool
  layouts: bool
  attention: bool
  attention_lengths: list
  attention_timed_length: int
  torch_python: str


def settings_from_flags() -> Settings:
  values = {}
  for f in dataclasses.fields(Settings):
    flag = flags.FLAGS[f.name]
    quick = _QUICK.value and f.name in QUICK and not flag.present
    peer = _PEER.value and f.name in PEER and not flag.present
    values[f.name] = QUICK[f.name] if quick else PEER[f.name] if peer else flag.value
  s = Settings(**values)
  if s.steps == 0:
    s = dataclasses.replace(s, steps=s.inner_steps)
  if s.repeats < 1 or s.steps < 1:
    raise app.UsageError("--repeats and --steps must be >= 1")
  try:
    s = dataclasses.replace(s, attention_lengths=[int(n) for n in s.attention_lengths])
  except ValueError:
    raise app.UsageError(f"--attention_lengths must be integers, got {s.attention_lengths}") \
        from None
  for n in s.attention_lengths + [s.attention_timed_length]:
    if n < 1 or n % min(ATTN_BLOCK, n):
      raise app.UsageError(f"attention lengths must be >= 1 and multiples of the block "
                           f"{ATTN_BLOCK} (or below it), got {n}")
  return s


# ----------------------------------------------------------------------------------- methods
class Runner:
  """One method's algorithm, its live state and the host step counter t.

  `programs` lists the jitted programs the method's `step` dispatches, with the arguments `step`
  gives them (the algorithm's own `programs`), so they can be compiled ahead of time; if `step`
  changes what it passes, the warm-up's excess time in the report shows it.
  """

  def __init__(self, name: str, algo, params, rng):
    self.name = name
    self.algo = algo
    self.state = algo.init(params, rng)
    self.t = 0
    # The same bound `step` keeps, for the loop that calls the inner-step program alone: an
    # unbounded queue of collectives deadlocked XLA:CPU's simulated devices (docs/design.md).
    self._bound = algorithm.DispatchBound(2)

  @property
  def is_dp(self) -> bool:
    return isinstance(self.algo, algorithm.DataParallel)

  def programs(self, batch) -> list[tuple[str, object, tuple]]:
    return self.algo.programs(self.state, batch)

  def run_steps(self, n: int, batches: list) -> tuple[float, float]:
    """n steps through the public `step` (syncs included): (wall, CPU) seconds, device work
    included."""
    jax.block_until_ready(self.state)
    clock = _Clock()
    for _ in range(n):
      self.t += 1
      self.state, _ = self.algo.step(self.state, batches[self.t % len(batches)], self.t)
    jax.block_until_ready(self.state)
    return clock.elapsed()

  def run_inner_only(self, n: int, batches: list) -> tuple[float, float]:
    """n calls of the inner-step program alone (for data-parallel that is its whole step)."""
    a = self.algo
    jax.block_until_ready(self.state)
    clock = _Clock()
    for i in range(n):
      # The host's t stays put: `step` requires consecutive t, and the schedule (keyed on t)
      # then simply resumes where the last period stopped.
      batch = batches[i % len(batches)]
      self._bound.wait()
      if self.is_dp:
        self.state, metrics = a._step(self.state, batch)
        loss = metrics["loss"]
      else:
        s = self.state
        step, local, inner_state, loss, _ = a._inner_step(s.step, s.local_params, s.inner_opt_state,
                                                       batch)
        self.state = s.replace(step=step, local_params=local, inner_opt_state=inner_state)
      self._bound.push(loss)
    jax.block_until_ready(self.state)
    self._bound.reset()
    return clock.elapsed()


class _Clock:
  """Wall time, and the CPU time of every thread of this process (the simulated devices are
  threads here). On a machine shared with other jobs, wall time depends on their load; CPU time
  counts only our own work, so its ratios are the steadier cross-check."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def elapsed(self) -> tuple[float, float]:
    return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _family(name: str):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"{name}_family", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _config_dict(s: Settings, name: str, total_steps: int):
  """The ConfigDict of one method: the trainer's tiny config (experiments/configs; DiLoCo's
  family for dp and diloco) resized by the settings."""
  c = _family("streaming" if name == "streaming" else "diloco").get_config("tiny")
  c.algorithm = name
  c.model.preset, c.model.num_layers = s.model, s.num_layers
  c.model.d_model, c.model.num_heads, c.model.ffn_dim = s.d_model, s.num_heads, s.ffn_dim
  c.model.mlp = s.mlp
  # The tokens are random: the data section only sets the vocabulary (0: the preset's).
  c.data.vocab_size = s.vocab_size or model_lib.PRESETS.get(s.model, {}).get("vocab_size", 0)
  c.data.seq_len = s.seq_len
  c.diloco.num_workers, c.diloco.inner_steps = s.workers, s.inner_steps
  c.train.num_steps, c.train.batch_size = total_steps, s.batch_size
  c.train.warmup_steps = min(30, total_steps // 4)
  if name == "streaming":
    c.diloco.layers_per_fragment = s.layers_per_fragment
    c.diloco.overlap_steps, c.diloco.merge_alpha = s.overlap_steps, s.merge_alpha
    c.diloco.codec = s.codec
  return c


def run_configs(s: Settings, total_steps: int) -> dict[str, config_lib.RunConfig]:
  """Each method's RunConfig (`_config_dict`), so the bench times what `diloco_jax.main`
  trains. The optimizers are the families' (the papers'); their hyperparameters do not change
  the cost of a step."""
  return {name: config_lib.from_config_dict(_config_dict(s, name, total_steps))
          for name in METHODS}


def layout_configs(s: Settings, total_steps: int,
                   batch_size: int) -> dict[str, config_lib.RunConfig]:
  """Streaming DiLoCo's RunConfig on each of LAYOUTS: the streaming method's config with
  diloco.num_workers=2, mesh.data and mesh.model overridden, and codec_block_size 16."""
  out = {}
  for name, (data, model) in LAYOUTS.items():
    c = _config_dict(s, "streaming", total_steps)
    c.diloco.num_workers, c.diloco.codec_block_size = LAYOUT_WORKERS, LAYOUT_BLOCK_SIZE
    c.mesh.data, c.mesh.model = data, model
    c.train.batch_size = batch_size
    out[name] = config_lib.from_config_dict(c)
  return out


def build_runners(rcs: dict[str, config_lib.RunConfig], mesh, params):
  rng = jax.random.PRNGKey(1)
  return {name: Runner(name, build.make_algorithm(rc, mesh, params), params, rng)
          for name, rc in rcs.items()}


# ------------------------------------------------------------------------------- measurements
def state_bytes(state) -> dict:
  """Bytes each device holds, per state field: the sum of the fields' addressable shards.

  Returns {"fields": {field: bytes on the fullest device}, "total": bytes on the fullest device,
  "per_device": [total bytes of each device]}.
  """
  per_field, per_device = {}, {}
  for field in dataclasses.fields(state):
    on_device = bytes_by_device(getattr(state, field.name))
    per_field[field.name] = max(on_device.values(), default=0)
    for d, b in on_device.items():
      per_device[d] = per_device.get(d, 0) + b
  return {"fields": per_field, "total": max(per_device.values()),
          "per_device": [per_device[d] for d in sorted(per_device)]}


def bytes_by_device(tree) -> dict[int, int]:
  """{device id: bytes of the tree's shards that device holds}."""
  on_device = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      on_device[shard.device.id] = on_device.get(shard.device.id, 0) + shard.data.nbytes
  return on_device


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):   # older jax: one dict per program
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def _memory(compiled) -> dict | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  return {k.replace("_size_in_bytes", ""): int(getattr(mem, k)) for k in keys}


def compile_program(name: str, fn, args) -> dict:
  """Lowers and compiles one program ahead of time: its times, FLOPs and memory."""
  start = time.perf_counter()
  lowered = fn.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return {"name": name, "lower_s": lowered_at - start, "compile_s": done - lowered_at,
          "flops": _flops(compiled), "memory": _memory(compiled)}


def compile_programs(runner: Runner, batch) -> list[dict]:
  """Lowers and compiles every program of a method ahead of time (cold: nothing ran before)."""
  return [compile_program(*program) for program in runner.programs(batch)]


def matmul_reference(mesh, n: int):
  """A jitted fp32 matmul on every device of the mesh at once (no communication): the dense
  FLOP/s these devices reach on the same cores, to compare the inner step's FLOP/s against."""
  D = mesh.devices.size
  sharding = mesh_lib.worker_sharding(mesh, 2)
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(rng.standard_normal((D, n, n), np.float32), sharding) for _ in range(2))
  f = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sharding)
  f(a, b).block_until_ready()   # compile
  flops = 2.0 * n**3 * D

  def time_once(calls: int = 5) -> float:
    start = time.perf_counter()
    out = [f(a, b) for _ in range(calls)]
    jax.block_until_ready(out)
    return flops * calls / (time.perf_counter() - start)

  return time_once


def _finite_ratio(a: float, b: float) -> float:
  return a / b if b > 0 else float("nan")


def _rotated(names: tuple, rep: int) -> tuple:
  """The order of repetition `rep`: rotated each time, against drift."""
  k = rep % len(names)
  return names[k:] + names[:k]


def _median_ratios(samples: dict[str, list], base: str) -> dict[str, float]:
  """Each name's ratio to `base` within the same repetition (adjacent in time), then the median
  over repetitions."""
  return {name: statistics.median(_finite_ratio(x, y) for x, y in zip(xs, samples[base]))
          for name, xs in samples.items()}


def _random_batches(mesh, M: int, batch_size: int, seq_len: int, vocab_size: int) -> list:
  """A few fixed batches of random tokens, placed once: the loops measure the devices' work,
  not the data pipeline's."""
  rng = np.random.default_rng(0)
  return [jax.device_put(rng.integers(0, vocab_size, (M, batch_size, seq_len + 1),
                                      dtype=np.int32), mesh_lib.batch_sharding(mesh))
          for _ in range(4)]


def run(s: Settings) -> dict:
  M, H, tau = s.workers, s.inner_steps, s.overlap_steps
  period_steps = H * math.ceil(s.steps / H)
  # By step 2H + τ every fragment has sent and merged once, so every program has run.
  warmup_steps = 2 * H + tau
  total_steps = warmup_steps + s.repeats * (period_steps + s.steps)
  rcs = run_configs(s, total_steps)
  cfg = rcs["dp"].model
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  N = sum(int(x.size) for x in jax.tree.leaves(params))
  # Over the first devices only: the layouts section may have asked for more.
  mesh = mesh_lib.make_mesh(s.workers, devices=jax.devices()[:main_device_count(s)])
  tokens_per_step = M * s.batch_size * s.seq_len

  batches = _random_batches(mesh, M, s.batch_size, s.seq_len, cfg.vocab_size)
  batch_bytes = max(bytes_by_device(batches[0]).values())

  runners = build_runners(rcs, mesh, params)
  memory = {name: state_bytes(r.state) for name, r in runners.items()}

  compiled = {name: compile_programs(r, batches[0]) for name, r in runners.items()}
  warmup_s = {name: r.run_steps(warmup_steps, batches)[0] for name, r in runners.items()}

  matmul = matmul_reference(mesh, s.matmul_size)
  # tokens/s samples per (kind, method); kind: period / inner, and the same per CPU-second.
  kinds = ("period", "inner", "period_cpu", "inner_cpu")
  tps = {k: {name: [] for name in METHODS} for k in kinds}
  matmul_fps = []
  for rep in range(s.repeats):
    for name in _rotated(METHODS, rep):
      r = runners[name]
      for kind, n, timed in (("period", period_steps, r.run_steps),
                             ("inner", s.steps, r.run_inner_only)):
        wall, cpu = timed(n, batches)
        tps[kind][name].append(tokens_per_step * n / wall)
        tps[kind + "_cpu"][name].append(tokens_per_step * n / max(cpu, 1e-9))
    matmul_fps.append(matmul())

  med = statistics.median
  ratio = {k: _median_ratios(tps[k], "dp") for k in kinds}
  period_tps, inner_tps = tps["period"], tps["inner"]
  matmul_med = med(matmul_fps)
  flops = {}
  for name in METHODS:
    inner_prog = compiled[name][0]
    step_s = tokens_per_step / med(inner_tps[name])
    cost = inner_prog["flops"]
    achieved = None if cost is None else cost * mesh.devices.size / step_s
    six_n = 6.0 * N * tokens_per_step / step_s
    flops[name] = {
        "cost_analysis_flops_per_step": None if cost is None else cost * mesh.devices.size,
        "achieved_flops_per_s": achieved,
        "fraction_of_matmul": None if achieved is None else achieved / matmul_med,
        "six_n_flops_per_s": six_n,
        "six_n_fraction_of_matmul": six_n / matmul_med,
    }

  dp_bytes = memory["dp"]["total"]
  frag_numel = runners["streaming"].algo.fragment_numel
  # Not implemented, computed for reference (SPEC §2 "Memory"): with the inactive fragments'
  # outer copy, outer momentum and in-flight Δ in host memory, a device holds the worker's
  # params and AdamW moments plus those three for the largest fragment only.
  itemsize = 4
  offload = memory["streaming"]["total"] - 3 * N * itemsize + 3 * max(frag_numel) * itemsize
  for name in METHODS:
    m = memory[name]
    m["ratio_vs_dp"] = m["total"] / dp_bytes
    m["param_copies"] = m["total"] / (N * itemsize)
    transient = [p["memory"]["temp"] + p["memory"]["output"] - p["memory"]["alias"]
                 for p in compiled[name] if p["memory"] is not None]
    m["peak_estimate"] = m["total"] + batch_bytes + max(transient, default=0)
  for name in METHODS:
    memory[name]["peak_estimate_ratio_vs_dp"] = (memory[name]["peak_estimate"]
                                                 / memory["dp"]["peak_estimate"])

  steady_step_s = {name: tokens_per_step / med(period_tps[name]) for name in METHODS}
  # What the sends, receives and syncs add to H steps beyond the H inner steps, in CPU-seconds
  # (the load-independent clock): a difference of two medians, so about 0 ± noise for
  # data-parallel, whose step is its inner step.
  cpu_step = {k: {name: tokens_per_step / med(tps[k + "_cpu"][name]) for name in METHODS}
              for k in ("period", "inner")}
  sync_cpu_s = {name: H * (cpu_step["period"][name] - cpu_step["inner"][name])
                for name in METHODS}
  # After the methods: it times alone. Worker 0's rows of the bench's batches.
  torch_cmp = run_torch(s, rcs["diloco"], params, runners["diloco"].algo.inner_opt,
                        np.stack([np.asarray(b)[0] for b in batches]))
  layouts = run_layouts(s) if s.layouts else None   # after the methods: it times alone
  attention = run_attention(s) if s.attention else None
  return {
      "settings": dataclasses.asdict(s),
      "model": {"preset": s.model, "num_layers": cfg.num_layers, "d_model": cfg.d_model,
                "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size, "mlp": cfg.mlp,
                "num_params": N},
      "devices": {"platform": jax.devices()[0].platform, "count": mesh.devices.size,
                  "workers_per_device": M // mesh.shape[mesh_lib.WORKER]},
      "streaming": {"num_fragments": len(frag_numel), "fragment_numel": list(frag_numel),
                    "tau": tau, "alpha": s.merge_alpha, "codec": s.codec},
      "tokens_per_step": tokens_per_step,
      "throughput": {
          **{k: {n: {"tokens_per_s": med(tps[k][n]), "samples": tps[k][n],
                     "tokens_per_cpu_s": med(tps[k + "_cpu"][n]),
                     "cpu_samples": tps[k + "_cpu"][n]} for n in METHODS}
             for k in ("period", "inner")},
          "period_steps": period_steps, "inner_steps_timed": s.steps,
          "sync_cpu_s_per_H_steps": sync_cpu_s,
          "sync_fraction_of_period_cpu": {n: sync_cpu_s[n] / (H * cpu_step["period"][n])
                                          for n in METHODS},
      },
      "throughput_ratio": ratio,
      "goal": {"min_ratio": GOAL, "streaming_period_ratio": ratio["period"]["streaming"],
               "streaming_period_ratio_cpu": ratio["period_cpu"]["streaming"],
               "met": bool(ratio["period"]["streaming"] >= GOAL)},
      "compile": {n: {"programs": compiled[n], "lower_s": sum(p["lower_s"] for p in compiled[n]),
                      "compile_s": sum(p["compile_s"] for p in compiled[n]),
                      "warmup_steps": warmup_steps, "warmup_s": warmup_s[n],
                      # What the first 2H+τ steps cost beyond steady state, after AOT compiled
                      # everything: near 0 when the calls reuse the AOT executables.
                      "warmup_excess_s": warmup_s[n] - warmup_steps * steady_step_s[n]}
                  for n in METHODS},
      "memory": {**{n: memory[n] for n in METHODS}, "batch_bytes_per_device": batch_bytes,
                 "paper_diloco_ratio": 5 / 3,
                 "streaming_offloaded_estimate": offload,
                 "streaming_offloaded_ratio_vs_dp": offload / dp_bytes},
      "flops": {"matmul": {"n": s.matmul_size, "devices": mesh.devices.size,
                           "flops_per_s": matmul_med, "samples": matmul_fps},
                **flops},
      "torch": torch_cmp,
      "layouts": layouts,
      "attention": attention,
  }


def main_device_count(s: Settings) -> int:
  """The simulated CPU devices the methods' mesh uses (the first ones)."""
  return s.cpu_devices or s.workers


def run_layouts(s: Settings) -> dict:
  """Streaming DiLoCo's inner step alone on each of LAYOUTS (M=2, built from RunConfigs like
  the trainer's): tokens/s interleaved over --repeats, state bytes per device by field, and the
  inner step's argument bytes per device (`memory_analysis`), each as a ratio to replicated."""
  if len(jax.devices()) < LAYOUT_DEVICES:
    return {"skipped": f"needs {LAYOUT_DEVICES} devices, {len(jax.devices())} exist"}
  M, names = LAYOUT_WORKERS, tuple(LAYOUTS)
  # Every layout's batch rows split evenly over its data axis.
  data_lcm = math.lcm(*(d for d, _ in LAYOUTS.values()))
  B = data_lcm * math.ceil(s.batch_size / data_lcm)
  warmup_calls = 2
  rcs = layout_configs(s, warmup_calls + s.repeats * s.steps, B)
  runners, batches, rows = {}, {}, {}
  for name, rc in rcs.items():
    mesh = build.make_mesh(rc)
    params = build.init_params(rc, mesh, jax.random.PRNGKey(0))
    r = runners[name] = Runner(name, build.make_algorithm(rc, mesh, params), params,
                               jax.random.PRNGKey(1))
    batches[name] = _random_batches(mesh, M, B, s.seq_len, rc.model.vocab_size)
    inner_prog = compile_program(*r.programs(batches[name][0])[0])
    leaves = jax.tree.leaves(params)
    specs = jax.tree.leaves(r.algo.specs, is_leaf=sharding.is_spec)
    rows[name] = {"data": rc.mesh.data, "model": rc.mesh.model, "devices": mesh.devices.size,
                  "numel_whole": sum(int(x.size) for x, spec in zip(leaves, specs, strict=True)
                                     if spec == P()),
                  "memory": state_bytes(r.state), "inner_step": inner_prog}
    r.run_inner_only(warmup_calls, batches[name])
  tokens_per_step = M * B * s.seq_len
  tps = {k: {name: [] for name in names} for k in ("wall", "cpu")}
  for rep in range(s.repeats):
    for name in _rotated(names, rep):
      wall, cpu = runners[name].run_inner_only(s.steps, batches[name])
      tps["wall"][name].append(tokens_per_step * s.steps / wall)
      tps["cpu"][name].append(tokens_per_step * s.steps / max(cpu, 1e-9))
  ratio = {k: _median_ratios(tps[k], "replicated") for k in tps}
  base = rows["replicated"]
  for name, row in rows.items():
    row["tokens_per_s"] = statistics.median(tps["wall"][name])
    row["tokens_per_cpu_s"] = statistics.median(tps["cpu"][name])
    row["samples"], row["cpu_samples"] = tps["wall"][name], tps["cpu"][name]
    row["ratio"], row["ratio_cpu"] = ratio["wall"][name], ratio["cpu"][name]
    mem, base_mem = row["memory"], base["memory"]
    # None where replicated holds nothing of the field either (e.g. residual without error
    # feedback).
    mem["fields_ratio"] = {f: b / base_mem["fields"][f] if base_mem["fields"][f] else None
                           for f, b in mem["fields"].items()}
    mem["ratio"] = mem["total"] / base_mem["total"]
    arg = row["inner_step"]["memory"]
    row["inner_step_argument_bytes"] = None if arg is None else arg["argument"]
    row["inner_step_argument_ratio"] = None if arg is None else _finite_ratio(
        arg["argument"], base["inner_step"]["memory"]["argument"])
  return {"workers": M, "batch_size": B, "seq_len": s.seq_len,
          "tokens_per_step": tokens_per_step, "inner_steps_timed": s.steps,
          "codec": s.codec, "codec_block_size": LAYOUT_BLOCK_SIZE, "host_cpus": os.cpu_count(),
          "rows": rows}


# ------------------------------------------------------------------------------------- torch
TORCH_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_step.py")
TORCH_REPEATS = 7   # at most; interleaved repetitions of the per-worker comparison


def _torch_python(s: Settings) -> tuple[str | None, str]:
  """(the Python to run torch_step.py with, or None; why not)."""
  if s.torch_python:
    if not os.access(s.torch_python, os.X_OK):
      return None, f"--torch_python={s.torch_python} is not an executable"
    return s.torch_python, ""
  if importlib.util.find_spec("torch") is not None:
    return sys.executable, ""
  return None, ("torch is not importable here; pass --torch_python=<a python with torch>, e.g. "
                "python3 -m venv VENV && VENV/bin/pip install torch numpy, then "
                "--torch_python=VENV/bin/python")


class _TorchServer:
  """experiments/torch_step.py --serve in a subprocess (one intra-op thread): one JSON line per
  command each way."""

  def __init__(self, python: str):
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    self.proc = subprocess.Popen([python, TORCH_STEP, "--serve", "--threads=1"], env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)

  def ask(self, **msg) -> dict:
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"torch_step.py exited: {self.proc.stderr.read()[-2000:]}")
    return json.loads(line)

  def close(self):
    try:
      self.ask(cmd="quit") if self.proc.poll() is None else None
    except (RuntimeError, BrokenPipeError, ValueError):
      pass
    self.proc.wait(timeout=30)


def run_torch(s: Settings, rc: config_lib.RunConfig, params, inner_opt, tokens) -> dict:
  """One worker's inner step (forward + backward + the inner optimizer) on one device, ours vs
  torch_step.py's PyTorch implementation of the same model and optimizer at one thread,
  interleaved: CPU seconds per step (each process's own clock) and their ratio, after checking
  that both compute the same loss on the same params and batches. `tokens` [n, B, L+1]."""
  import functools
  import tempfile
  python, why = _torch_python(s)
  if python is None:
    return {"skipped": why}
  cfg, t = rc.model, rc.train
  loss_fn = functools.partial(model_lib.loss_fn, cfg)
  device = jax.devices()[0]
  ours = jax.jit(lambda p, o, b: _worker_step(loss_fn, inner_opt, p, o, b),
                 donate_argnums=(0, 1))
  host = jax.device_get(params)
  state = jax.device_put((host, inner_opt.init(host)), device)
  batches = [jax.device_put(b, device) for b in tokens]
  our_losses = [float(jax.jit(loss_fn)(state[0], b)[0]) for b in batches]
  flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(host)[0]}
  opt = {"learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps,
         "num_steps": t.num_steps, "final_lr_fraction": t.final_lr_fraction, "b1": t.b1,
         "b2": t.b2, "grad_clip": t.grad_clip or 0.0,
         "weight_decay": 1.0 / t.num_steps if t.weight_decay is None else t.weight_decay}
  model = {k: getattr(cfg, k) for k in ("vocab_size", "num_layers", "d_model", "num_heads",
                                        "ffn_dim", "mlp", "norm_eps", "rope_base", "z_loss")}
  steps = max(4, min(s.steps, 20))
  server = _TorchServer(python)
  try:
    with tempfile.TemporaryDirectory() as tmp:
      np.savez(os.path.join(tmp, "params.npz"), **flat)
      np.save(os.path.join(tmp, "tokens.npy"), np.asarray(tokens))
      init = server.ask(cmd="init", arch="ours", params=os.path.join(tmp, "params.npz"),
                        tokens=os.path.join(tmp, "tokens.npy"), model=model, opt=opt)
    if "error" in init:
      raise RuntimeError(init["error"])

    def run_ours(n):
      nonlocal state
      jax.block_until_ready(state)
      clock = _Clock()
      for i in range(n):
        p, o, loss = ours(*state, batches[i % len(batches)])
        state = (p, o)
      jax.block_until_ready(state)
      return clock.elapsed()

    def run_torch_steps(n):
      r = server.ask(cmd="time", steps=n)
      return r["wall_s"], r["cpu_s"]

    run_ours(2)
    run_torch_steps(2)   # first calls outside the timing
    timed = {"ours": run_ours, "torch": run_torch_steps}
    samples = {name: {"wall": [], "cpu": []} for name in timed}
    for rep in range(min(s.repeats, TORCH_REPEATS)):
      for name in _rotated(tuple(timed), rep):
        wall, cpu = timed[name](steps)
        samples[name]["wall"].append(wall / steps)
        samples[name]["cpu"].append(cpu / steps)
  finally:
    server.close()
  med = statistics.median
  ratio = {k: med(a / b for a, b in zip(samples["ours"][k], samples["torch"][k]))
           for k in ("wall", "cpu")}
  return {"python": python, "torch": init["torch"], "threads": init["threads"],
          "steps_per_sample": steps, "our_losses": our_losses, "torch_losses": init["losses"],
          "max_loss_diff": max(abs(a - b) for a, b in zip(our_losses, init["losses"])),
          "samples_s": samples,
          "step_s": {n: {k: med(v) for k, v in x.items()} for n, x in samples.items()},
          "ours_over_torch": ratio,
          "torch_tokens_per_s_all_cores": (os.cpu_count() or 1) * s.batch_size * s.seq_len
                                           / med(samples["torch"]["cpu"])}


def _worker_step(loss_fn, opt, params, opt_state, batch):
  from diloco_jax import inner
  p, o, loss, _ = inner.worker_step(loss_fn, opt, params, opt_state, batch)
  return p, o, loss


def format_torch(tr: dict, r: dict) -> list[str]:
  if "skipped" in tr:
    return [f"torch comparison: skipped ({tr['skipped']})"]
  st, q = tr["step_s"], tr["ours_over_torch"]
  M = r["settings"]["workers"]
  inner_cpu = {n: r["tokens_per_step"] / r["throughput"]["inner"][n]["tokens_per_cpu_s"] / M
               for n in ("diloco", "streaming")}
  return [
      f"one worker's inner step (forward + backward + AdamW, B = {r['settings']['batch_size']}, "
      f"L = {r['settings']['seq_len']}) vs PyTorch {tr['torch']} (experiments/torch_step.py, "
      f"the same model and optimizer, {tr['threads']} thread), medians of "
      f"{len(tr['samples_s']['ours']['cpu'])} interleaved repetitions of "
      f"{tr['steps_per_sample']} steps",
      f"  same loss at the same params: max |ours - torch| = {tr['max_loss_diff']:.2e} over "
      f"{len(tr['our_losses'])} batches",
      f"  CPU ms per step: ours (one device) {st['ours']['cpu'] * 1e3:.1f}, torch "
      f"{st['torch']['cpu'] * 1e3:.1f}; ours / torch {q['cpu']:.3f} (wall {q['wall']:.3f}; "
      f"goal <= 1)",
      f"  ours inside the M = {M} simulated-worker inner step: CPU ms per worker-step "
      + ", ".join(f"{NAMES[n]} {v * 1e3:.1f} ({v / st['torch']['cpu']:.3f} of torch)"
                  for n, v in inner_cpu.items()),
      f"  torch at one thread per worker on all {os.cpu_count()} cores would make about "
      f"{tr['torch_tokens_per_s_all_cores']:,.0f} tokens/s (inner steps only)"]


# ------------------------------------------------------------------------------------ report
NAMES = {"dp": "data-parallel", "diloco": "DiLoCo", "streaming": "Streaming DiLoCo"}


def _attention_fns() -> dict:
  """The attention implementations this backend can run, as f(q, k, v) on [B, L, H, K]: dense
  and blockwise everywhere, and the platform's own kernel (cuDNN on GPU, splash on TPU)."""
  from diloco_jax.model import attention as attention_lib, blockwise, kernels
  fns = {"dense": attention_lib.dense_attention,
         "blockwise": lambda q, k, v: blockwise.blockwise_attention(
             q, k, v, min(ATTN_BLOCK, q.shape[1]))}
  platform = jax.devices()[0].platform
  if platform == "gpu":   # cuDNN takes 16-bit inputs only: its row runs in bfloat16
    fns["cudnn"] = lambda q, k, v: kernels.cudnn_attention(
        *(x.astype(jnp.bfloat16) for x in (q, k, v))).astype(q.dtype)
  if platform == "tpu":
    fns["splash"] = lambda q, k, v: kernels.splash_attention(q, k, v, None,
                                                             min(ATTN_BLOCK, q.shape[1]))
  return fns


def _attention_program(fn, L: int):
  """One layer's forward + backward, (q, k, v, dO) -> (dQ, dK, dV), compiled ahead of time
  for length L: (its memory_analysis, the executable)."""
  shape = jax.ShapeDtypeStruct((ATTN_BATCH, L, ATTN_HEADS, ATTN_HEAD_DIM), jnp.float32)
  program = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
  compiled = program.lower(*(shape,) * 4).compile()
  return _memory(compiled), compiled


def run_attention(s: Settings) -> dict:
  """Per length, each implementation's compiled forward+backward memory (`memory_analysis`:
  its temporaries are what the [L, L] scores cost); at the timed length, wall seconds per
  forward+backward (interleaved repetitions) and dense's time as a ratio to each."""
  fns = _attention_fns()
  rows = []
  for L in s.attention_lengths:
    rows.append({"seq_len": L, **{name: _attention_program(fn, L)[0]
                                  for name, fn in fns.items()}})
  L = s.attention_timed_length
  shape = (ATTN_BATCH, L, ATTN_HEADS, ATTN_HEAD_DIM)
  args = [jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(0), 4)]
  programs = {name: _attention_program(fn, L)[1] for name, fn in fns.items()}
  for program in programs.values():
    jax.block_until_ready(program(*args))   # a first call outside the timing
  samples = {name: [] for name in fns}
  for rep in range(min(s.repeats, ATTN_REPEATS)):
    for name in _rotated(tuple(fns), rep):
      start = time.perf_counter()
      jax.block_until_ready(programs[name](*args))
      samples[name].append(time.perf_counter() - start)
  seconds = {name: statistics.median(x) for name, x in samples.items()}
  return {"batch": ATTN_BATCH, "heads": ATTN_HEADS, "head_dim": ATTN_HEAD_DIM,
          "block": ATTN_BLOCK, "dtype": "float32", "implementations": list(fns), "rows": rows,
          "timed": {"seq_len": L, "samples_s": samples, "seconds": seconds,
                    "dense_over": {name: seconds["dense"] / t for name, t in seconds.items()}}}


def format_attention(att: dict) -> list[str]:
  names = att["implementations"]
  gib = lambda b: f"{b / 2**30:.3f}"
  out = [f"attention, one layer's forward+backward: B = {att['batch']}, H = {att['heads']}, "
         f"K = {att['head_dim']}, {att['dtype']}, blockwise tiles of {att['block']}",
         f"  temporaries GiB (memory_analysis) {'L':>8s}" + "".join(f"{n:>12s}" for n in names)]
  for row in att["rows"]:
    out.append(f"  {'':33s} {row['seq_len']:8,d}" + "".join(
        f"{gib(row[n]['temp']) if row[n] else 'n/a':>12s}" for n in names))
  t = att["timed"]
  out.append(f"  wall s per forward+backward at L = {t['seq_len']:,} (median)"
             + "".join(f"  {n} {t['seconds'][n]:.3f}" for n in names))
  out.append("  dense's time over each: " + ", ".join(f"{n} {t['dense_over'][n]:.2f}x"
                                                      for n in names if n != "dense"))
  return out


def _si(x: float | None, unit: str = "") -> str:
  if x is None:
    return "n/a"
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def format_report(r: dict) -> str:
  s, m, d, st = r["settings"], r["model"], r["devices"], r["streaming"]
  out = [
      f"model {m['preset']}: {m['num_layers']} blocks, d_model {m['d_model']}, vocab "
      f"{m['vocab_size']}, N = {m['num_params']:,} params (fp32)",
      f"M = {s['workers']} workers on {d['count']} {d['platform']} devices "
      f"({d['workers_per_device']} per device), B = {s['batch_size']}, L = {s['seq_len']}, "
      f"{r['tokens_per_step']} tokens/step; H = {s['inner_steps']}",
      f"Streaming DiLoCo: P = {st['num_fragments']} fragments {tuple(st['fragment_numel'])}, "
      f"τ = {st['tau']}, α = {st['alpha']}, codec {st['codec']}; DiLoCo: fp32, τ = 0",
      f"medians of {s['repeats']} interleaved repetitions",
      "",
      f"throughput, tokens/s     {'whole H-step periods':>25s}   {'inner step alone':>25s}",
      f"  (ratio to DP)      {'wall':>10s} {'ratio':>6s} {'/CPU-s':>7s} {'ratio':>6s}"
      f"   {'wall':>7s} {'ratio':>6s} {'/CPU-s':>7s} {'ratio':>6s}",
  ]
  tp, ratio = r["throughput"], r["throughput_ratio"]
  for n in METHODS:
    row = f"  {NAMES[n]:17s}"
    for k in ("period", "inner"):
      row += (f" {tp[k][n]['tokens_per_s']:10,.0f} {ratio[k][n]:6.3f}"
              f" {tp[k][n]['tokens_per_cpu_s']:7,.0f} {ratio[k + '_cpu'][n]:6.3f}  ")
    out.append(row.rstrip())
  out.append("  (DiLoCo's and Streaming DiLoCo's inner steps are the same program: the gap between "
             "their inner-step ratios is the noise)")
  out.append("  sync cost per H steps (periods minus inner steps, CPU time): " + ", ".join(
      f"{NAMES[n]} {tp['sync_cpu_s_per_H_steps'][n] * 1e3:.0f} ms "
      f"({tp['sync_fraction_of_period_cpu'][n]:.1%})" for n in METHODS))
  g = r["goal"]
  out.append(f"  goal: Streaming DiLoCo >= {g['min_ratio']} of data-parallel over whole periods "
             f"(wall clock): {'met' if g['met'] else 'NOT met'} ({g['streaming_period_ratio']:.3f};"
             f" per CPU-second {g['streaming_period_ratio_cpu']:.3f}; {tp['period_steps']} steps "
             f"per repetition)")
  out += ["", "compile (jax AOT, cold)  programs   lower s  compile s   warm-up excess s"]
  for n in METHODS:
    c = r["compile"][n]
    out.append(f"  {NAMES[n]:21s} {len(c['programs']):8d} {c['lower_s']:9.2f} "
               f"{c['compile_s']:10.2f} {c['warmup_excess_s']:18.2f}")
  out.append("  (warm-up excess: the first 2H+τ steps' time beyond steady state, after AOT)")

  mem = r["memory"]
  fields = []
  for n in METHODS:
    fields += [f for f in mem[n]["fields"] if f not in fields]
  out += ["", f"state bytes per device {'':11s}" + "".join(f"{NAMES[n]:>18s}" for n in METHODS)]
  for f in fields:
    out.append(f"  {f:32s}" + "".join(
        f"{mem[n]['fields'][f]:18,d}" if f in mem[n]["fields"] else f"{'-':>18s}"
        for n in METHODS))
  out.append(f"  {'total':32s}" + "".join(f"{mem[n]['total']:18,d}" for n in METHODS))
  out.append(f"  {'copies of the params (4N bytes)':32s}"
             + "".join(f"{mem[n]['param_copies']:18.3f}" for n in METHODS))
  out.append(f"  {'ratio to data-parallel':32s}"
             + "".join(f"{mem[n]['ratio_vs_dp']:18.4f}" for n in METHODS))
  out.append(f"  {'peak estimate (memory_analysis)':32s}"
             + "".join(f"{mem[n]['peak_estimate']:18,d}" for n in METHODS))
  out.append(f"  {'  its ratio to data-parallel':32s}"
             + "".join(f"{mem[n]['peak_estimate_ratio_vs_dp']:18.4f}" for n in METHODS))
  out.append(f"  paper: DiLoCo 5/3 = {5 / 3:.4f} of DP (params + 2 Adam moments + outer copy + "
             f"outer momentum); measured {mem['diloco']['ratio_vs_dp']:.4f}")
  out.append(f"  Streaming DiLoCo holds every fragment's outer state and in-flight Δ on device "
             f"(no offload): {mem['streaming']['ratio_vs_dp']:.4f} of DP; with offload (not "
             f"implemented, computed) {mem['streaming_offloaded_ratio_vs_dp']:.4f}")
  out.append("  peak estimate = state + batch + the largest program's temp + unaliased outputs")

  fl = r["flops"]
  mm = fl["matmul"]
  out += ["", f"FLOP/s of the inner step alone; reference: fp32 {mm['n']}x{mm['n']} matmul on "
          f"{mm['devices']} devices at once = {_si(mm['flops_per_s'], 'FLOP/s')}",
          f"  {'':17s} {'XLA cost_analysis':>20s} {'of matmul':>10s} {'6·N·tokens':>16s} "
          f"{'of matmul':>10s}"]
  for n in METHODS:
    f = fl[n]
    frac = "n/a" if f["fraction_of_matmul"] is None else f"{f['fraction_of_matmul']:.3f}"
    out.append(f"  {NAMES[n]:17s} {_si(f['achieved_flops_per_s'], 'FLOP/s'):>20s} {frac:>10s} "
               f"{_si(f['six_n_flops_per_s'], 'FLOP/s'):>16s} "
               f"{f['six_n_fraction_of_matmul']:10.3f}")
  out.append("  (cost_analysis counts every HLO op of the compiled step, optimizer included, on "
             "every device; 6·N·tokens counts the matmuls of forward and backward with N = all "
             "params, the tied embedding once)")
  out += [""] + format_torch(r["torch"], r)
  if r["layouts"] is not None:
    out += [""] + format_layouts(r["layouts"], r["devices"]["platform"], s["repeats"])
  if r["attention"] is not None:
    out += [""] + format_attention(r["attention"])
  out.append(f"\nthis run: {r['bench_wall_s']:.0f} s")
  return "\n".join(out)


LAYOUT_NAMES = {"replicated": "replicated", "fsdp": "FSDP", "fsdp_tp": "FSDP+TP"}


def format_layouts(lay: dict, platform: str, repeats: int) -> list[str]:
  if "skipped" in lay:
    return [f"layouts inside a worker: skipped ({lay['skipped']})"]
  rows = lay["rows"]
  out = [f"layouts inside a worker: Streaming DiLoCo, M = {lay['workers']} workers, B = "
         f"{lay['batch_size']}, L = {lay['seq_len']} ({lay['tokens_per_step']} tokens/step), "
         f"codec {lay['codec']} with codec_block_size {lay['codec_block_size']} on every row "
         f"(FSDP's 4-way split of d_model leaves runs of d_model/4 values per device, which a "
         f"block must not straddle)"]
  if platform == "cpu":
    out.append(f"  XLA:CPU: the simulated devices share the same {lay['host_cpus']} cores, so "
               f"FSDP/TP cannot be faster here; the ratios show the cost of the extra "
               f"collectives and the memory saving, not a speed-up")
  out += [f"  medians of {repeats} interleaved repetitions of {lay['inner_steps_timed']} "
          f"inner steps",
          f"  inner step alone, tokens/s {'devices':>10s} {'wall':>9s} {'ratio':>6s} "
          f"{'/CPU-s':>8s} {'ratio':>6s} {'compile s':>10s}"]
  for name, row in rows.items():
    label = f"{LAYOUT_NAMES[name]} (data={row['data']}, model={row['model']})"
    out.append(f"    {label:32s} {row['devices']:2d} {row['tokens_per_s']:9,.0f} "
               f"{row['ratio']:6.3f} {row['tokens_per_cpu_s']:8,.0f} {row['ratio_cpu']:6.3f} "
               f"{row['inner_step']['compile_s']:10.2f}")

  def cells(values):   # (bytes, ratio to replicated) per layout
    return "".join(f"{b:14,d} {'-' if q is None else f'{q:.3f}':>6s}" for b, q in values)

  out.append(f"  {'state bytes per device':35s}"
             + "".join(f"{LAYOUT_NAMES[n]:>14s} {'ratio':>6s}" for n in rows))
  for f in rows["replicated"]["memory"]["fields"]:
    out.append(f"    {f:33s}" + cells((row["memory"]["fields"][f],
                                        row["memory"]["fields_ratio"][f])
                                       for row in rows.values()))
  out.append(f"    {'total':33s}" + cells((row["memory"]["total"], row["memory"]["ratio"])
                                          for row in rows.values()))
  out.append(f"    {'inner step args (memory_analysis)':33s}" + cells(
      (row["inner_step_argument_bytes"] or 0, row["inner_step_argument_ratio"])
      for row in rows.values()))
  out.append("  params whole on every device of a worker: " + ", ".join(
      f"{LAYOUT_NAMES[n]} {row['numel_whole']:,}" for n, row in rows.items())
      + " (under FSDP and TP: the RMSNorm scales)")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  s = settings_from_flags()
  logging.set_verbosity(logging.WARNING)   # jax logs every backend it probes at INFO
  n = main_device_count(s)
  mesh_lib.set_cpu_device_count(max(n, LAYOUT_DEVICES) if s.layouts else n)
  start = time.perf_counter()
  try:
    report = run(s)
  except ValueError as e:   # a bad flag value, named by the library's one-sentence message
    print(f"bench: {e}", file=sys.stderr)
    return 2
  report["bench_wall_s"] = time.perf_counter() - start
  print(json.dumps(report, indent=1) if _JSON.value else format_report(report), flush=True)


if __name__ == "__main__":
  app.run(main)
