"""Ahead-of-time check: does a config fit its target devices? Nothing is allocated or trained.

  python -m diloco_jax.aot --config=experiments/configs/streaming.py:paper \
      --config.model.preset=1B --config.mesh.data=4 --devices=8 --hbm_gib=16

On simulated CPU devices shaped like the target mesh (M workers x mesh.data x mesh.model), it
builds the training state abstractly, lowers and compiles the programs of one outer round (the
inner step, and each fragment's send/sync/receive), and prints per device:

* the state each device holds, field by field, in device and in host memory (exact: from the
  shardings): per-worker params and inner optimizer state, the outer params and outer optimizer
  state (sharded inside a worker, replicated over workers; in host memory with
  `diloco.offload_outer`), in-flight outer gradients, quantizer residuals, and the ratio of the
  device-resident state to data-parallel's (params + AdamW on the same mesh);
* each compiled program's temporary memory (XLA:CPU's buffer assignment: activations and
  gradients; a TPU or GPU compiler fuses and rematerialises differently, so treat it as an
  estimate) and compile time;
* the peak estimate, device state + batch + the largest (temporaries + what the program fetches
  from host memory), against `--hbm_gib`.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from diloco_jax.cli import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Simulated devices (0: M * mesh.data * "
                                "mesh.expert * mesh.model, one mesh's worth).", lower_bound=0)
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Memory per device to check against, GiB "
                          "(e.g. 16 for TPU v5e, 95 for v5p, 80 for H100); 0: no verdict.",
                          lower_bound=0.0)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.mark_flags_as_required(["config"])

GIB = 2**30


def _bytes_per_device(tree, memory_kind: str = "device") -> int:
  """Bytes one device holds in `memory_kind` of an abstract tree with shardings (the largest
  device's share)."""
  import jax  # noqa: PLC0415
  total = 0
  for x in jax.tree.leaves(tree):
    if (x.sharding.memory_kind or "device") == memory_kind:
      total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def _with_shardings(abstract, shardings):
  import jax  # noqa: PLC0415
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _compile(name: str, fn, *args) -> dict:
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {"program": name, "compile_s": seconds,
          "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)),
          "argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0)),
          "output_bytes": int(getattr(mem, "output_size_in_bytes", 0)),
          # What the program brings from host memory (the offloaded fragment's outer state):
          # device memory it needs while it runs, on top of its temporaries.
          "fetched_bytes": _bytes_per_device(args, "pinned_host")}


def check(config, hbm_gib: float = 0.0) -> dict:
  """The report as a dict (JAX must already have the simulated devices)."""
  import jax  # noqa: PLC0415

  from diloco_jax import build, config as config_lib, mesh as mesh_lib  # noqa: PLC0415
  from diloco_jax import model as model_lib  # noqa: PLC0415

  rc = config_lib.from_config_dict(config)
  M = rc.diloco.num_workers
  mesh = build.make_mesh(rc)
  key = jax.random.PRNGKey(rc.seed)
  params = jax.eval_shape(functools.partial(model_lib.init_params, rc.model), key)
  numel = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  algo = build.make_algorithm(rc, mesh, params)
  # eval_shape runs init abstractly, which binds the layout that state_shardings() returns.
  state = _with_shardings(jax.eval_shape(algo.init, params, key), algo.state_shardings())
  batch = jax.ShapeDtypeStruct((M, rc.train.batch_size, rc.data.seq_len + 1), jax.numpy.int32,
                               sharding=mesh_lib.batch_sharding(mesh))

  if rc.algorithm == "dp":
    fields = {"params": state.params, "optimizer state": state.opt_state}
  else:
    fields = {"worker params": state.local_params, "inner optimizer state": state.inner_opt_state,
              "outer params": state.outer_params, "outer optimizer state": state.outer_opt_state,
              "in-flight outer gradients": state.inflight, "quantizer residuals": state.residual,
              "sync status": state.status}
  programs = [_compile(name, fn, *args) for name, fn, args in algo.programs(state, batch)]
  state_bytes = {k: _bytes_per_device(v) for k, v in fields.items()}
  host_bytes = {k: _bytes_per_device(v, "pinned_host") for k, v in fields.items()}
  batch_bytes = _bytes_per_device(batch)
  resting = sum(state_bytes.values())
  busiest = max(p["temp_bytes"] + p["fetched_bytes"] for p in programs)
  peak = resting + batch_bytes + busiest
  # Data-parallel training of the same model on the same mesh holds the params and AdamW's two
  # moments: the worker params and inner optimizer state of a DiLoCo worker.
  dp_state = (state_bytes["params"] + state_bytes["optimizer state"] if rc.algorithm == "dp"
              else state_bytes["worker params"] + state_bytes["inner optimizer state"])
  out = {"algorithm": rc.algorithm, "num_params": numel, "num_workers": M,
         "mesh": dict(mesh.shape), "devices": mesh.devices.size,
         "offload_outer": bool(getattr(algo, "offload_outer", False)),
         "remat": rc.model.remat, "batch_size": rc.train.batch_size, "seq_len": rc.data.seq_len,
         "state_bytes_per_device": state_bytes, "host_state_bytes_per_device": host_bytes,
         "batch_bytes_per_device": batch_bytes, "programs": programs,
         "state_vs_dp": resting / dp_state,
         "state_vs_dp_in_sync": (resting + max(p["fetched_bytes"] for p in programs)) / dp_state,
         "peak_bytes_per_device": peak}
  if hbm_gib:
    out["hbm_gib"] = hbm_gib
    out["fits"] = peak <= hbm_gib * GIB
  return out


def _size(n: int) -> str:
  return f"{n / GIB:10.3f} GiB" if n >= GIB / 10 else f"{n / 2**20:10.3f} MiB"


def format_report(r: dict) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"{r['algorithm']}: {r['num_params']:,} params, M={r['num_workers']}, mesh {mesh} "
           f"({r['devices']} devices), B={r['batch_size']} L={r['seq_len']} remat={r['remat']}"
           f"{', outer state offloaded' if r['offload_outer'] else ''}",
           "per device:             device memory      host memory"]
  for k, v in r["state_bytes_per_device"].items():
    host = r["host_state_bytes_per_device"][k]
    lines.append(f"  {k:<28}{_size(v)}" + (f"   {_size(host)}" if host else ""))
  lines.append(f"  {'batch':<28}{_size(r['batch_bytes_per_device'])}")
  for p in r["programs"]:
    fetched = f" + {_size(p['fetched_bytes']).strip()} fetched" if p["fetched_bytes"] else ""
    lines.append(f"  {'temp, ' + p['program']:<28}{_size(p['temp_bytes'])}{fetched}"
                 f"   (compiled in {p['compile_s']:.1f} s)")
  lines.append(f"  {'state / data-parallel':<28}{r['state_vs_dp']:10.3f}"
               f"   ({r['state_vs_dp_in_sync']:.3f} while a fragment syncs)")
  lines.append(f"  {'peak estimate':<28}{_size(r['peak_bytes_per_device'])}")
  if "fits" in r:
    lines.append(f"  {'fits in ' + str(r['hbm_gib']) + ' GiB':<28}{'yes' if r['fits'] else 'NO'}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from diloco_jax import build, config as config_lib, mesh as mesh_lib  # noqa: PLC0415
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    rc = config_lib.from_config_dict(config)   # starts no JAX backend
    mesh_lib.set_cpu_device_count(_DEVICES.value or build.cpu_devices_for(rc))
    report = check(config, _HBM.value)
  except ValueError as e:   # a ConfigError, or a mesh that does not fit the devices
    print(f"config error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(report, indent=2) if _JSON.value else format_report(report))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
