"""Device meshes with the axis names WORKER, DATA, EXPERT, CONTEXT and MODEL.

The mesh is an ordered list of (axis, size): `worker` first, then the axes inside one worker:
`data` (FSDP: the batch and the parameters' `embed` dimension), `expert` (expert parallelism),
`context` (the sequence, ring attention) and `model` (tensor parallelism: heads, MLP, vocab).
Every axis is always present (size 1 when unused), so a PartitionSpec naming it is valid on
every mesh. Which parameter dimension goes on which axis is `sharding.py`'s rule table.

The worker axis carries the DiLoCo replicas (M); it is the axis that may cross the slow network.
`device_grid` decides which device sits where:

* one granule (one process of simulated CPU devices, one GPU node, one TPU slice): the workers
  split the granule's devices (TPU: along its physical torus, `mesh_utils.create_device_mesh`);
* several granules (TPU slices by `slice_index`, else processes by `process_index`: GPU nodes,
  CPU processes): the worker axis goes over the granules (the DCN / inter-node network) with
  `mesh_utils.create_hybrid_device_mesh`, and a worker's data and model axes stay inside its
  granule. With more granules than workers, each worker spans G/M granules and its data axis
  crosses them. The expert, context and model axes never leave a granule.

Only this module spells the axis names.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from diloco_jax import checks

WORKER = "worker"
DATA = "data"
EXPERT = "expert"
CONTEXT = "context"
MODEL = "model"
AXES = (WORKER, DATA, EXPERT, CONTEXT, MODEL)
INNER_AXES = AXES[1:]   # the axes inside one worker (its slice / node): never the slow network


def set_cpu_device_count(n: int) -> None:
  """Asks XLA for `n` simulated host devices. Must run before JAX initialises its backends.

  Also turns off Eigen's intra-op thread pool on CPU (unless XLA_FLAGS already says otherwise):
  the simulated devices already share the cores, so it buys nothing (same tokens/s on the
  quick-start run), and a pool shared by every device's computations is a reported source of
  wedged CPU programs; we saw one collective rendezvous time out with it on.
  """
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  if not any(f.startswith("--xla_cpu_multi_thread_eigen") for f in flags):
    flags.append("--xla_cpu_multi_thread_eigen=false")
  # XLA:CPU (jaxlib 0.10) hands dots and row reductions to YNNPACK by default; its reductions
  # (the norms' means, the softmax sums) cost more than XLA's own loops: dots only made one
  # worker's inner step 0.75-0.92x the CPU time, the same loss to 7 digits (docs/cpu_speed.md).
  if not any(f.startswith("--xla_cpu_experimental_ynn_fusion_type") for f in flags):
    flags.append("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  jax.config.update("jax_num_cpu_devices", n)


def worker_axis_size(num_workers: int, num_devices: int, per_worker: int = 1) -> int:
  """The largest divisor of M whose mesh fits the devices: more workers than devices still works,
  the leading worker dimension is then only partly sharded (several workers per device)."""
  fit = max(1, num_devices // per_worker)
  return max(d for d in range(1, num_workers + 1) if num_workers % d == 0 and d <= fit)


def _granules(devices) -> tuple[str | None, list[list]]:
  """Groups devices by the slow-network unit: TPU slice if there are several, else process if
  there are several (GPU nodes, CPU processes), else one group."""
  for attr in ("slice_index", "process_index"):
    keys = sorted({getattr(d, attr, 0) for d in devices})
    if len(keys) > 1:
      return attr, [[d for d in devices if getattr(d, attr) == k] for k in keys]
  return None, [list(devices)]


def inner_sizes(data: int = 1, model: int = 1, expert: int = 1, context: int = 1) -> tuple:
  """The sizes of INNER_AXES, in their order."""
  sizes = {DATA: data, EXPERT: expert, CONTEXT: context, MODEL: model}
  for name, n in sizes.items():
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ValueError(f"mesh.{name} must be an integer >= 1, got {n!r}")
  return tuple(sizes[a] for a in INNER_AXES)


def device_grid(num_workers: int, data: int = 1, model: int = 1, devices=None, *,
                expert: int = 1, context: int = 1) -> np.ndarray:
  """The [worker, data, expert, context, model] array of devices for M workers (see the module
  docstring).

  Works on any objects with JAX's device attributes (`platform`, `process_index`, and for TPU
  `slice_index`, `coords`, `core_on_chip`, `device_kind`), so it is tested on fake topologies.
  """
  num_workers = checks.integer("num_workers (M)", num_workers, 1)
  devices = list(jax.devices() if devices is None else devices)
  inner = inner_sizes(data, model, expert, context)
  per_worker = int(np.prod(inner))
  attr, groups = _granules(devices)
  if attr is None:   # one slice / node / process: the workers share it
    w = worker_axis_size(num_workers, len(devices), per_worker)
    n = w * per_worker
    if n > len(devices):
      raise ValueError(f"mesh needs {per_worker} devices per worker (mesh.data x mesh.model ..."
                       f" = {' x '.join(map(str, inner))}) but only {len(devices)} devices exist")
    if devices[0].platform == "tpu" and n == len(devices):
      return mesh_utils.create_device_mesh((w, *inner), devices)
    return np.asarray(devices[:n], dtype=object).reshape(w, *inner)
  g, size = len(groups), len(groups[0])
  name = "slice" if attr == "slice_index" else "process"
  names = "slices" if attr == "slice_index" else "processes"
  if any(len(x) != size for x in groups):
    raise ValueError(f"every {name} must have the same number of devices, got "
                     f"{[len(x) for x in groups]}")
  if num_workers % g == 0:   # k workers per granule, the worker axis over the slow network
    k = num_workers // g
    w_in = worker_axis_size(k, size, per_worker)
    if w_in * per_worker != size:
      raise ValueError(
          f"each {name} has {size} devices but its {k} worker(s) with mesh.data={data} and "
          f"mesh.model={model} fill {w_in * per_worker}; choose mesh.data*mesh.model so that "
          f"a {name}'s devices are all used")
    ici, dcn = (w_in, *inner), (g,) + (1,) * len(inner)
  elif g % num_workers == 0:   # each worker spans g/M granules; its data axis crosses them
    span = g // num_workers
    rest = per_worker // data   # expert * context * model: never across granules
    if data % span or (data // span) * rest != size:
      raise ValueError(
          f"{num_workers} workers over {g} {names} of {size} devices: each worker spans {span} "
          f"{names}, so mesh.data must be {span * size // rest} (mesh.model={model}), "
          f"got {data}")
    ici = (1, data // span, *inner[1:])
    dcn = (num_workers, span) + (1,) * (len(inner) - 1)
  else:
    raise ValueError(f"M={num_workers} workers cannot be spread evenly over {g} {names}: "
                     f"M must divide or be a multiple of the {name} count")
  return mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=attr == "process_index")


def make_mesh(num_workers: int, data: int = 1, model: int = 1, devices=None, *,
              expert: int = 1, context: int = 1) -> Mesh:
  """The (worker, data, expert, context, model) mesh for M workers over the given (default: all)
  devices."""
  return Mesh(device_grid(num_workers, data, model, devices, expert=expert, context=context),
              AXES)


def abstract_mesh(num_workers: int, data: int = 1, model: int = 1, *, expert: int = 1,
                  context: int = 1) -> AbstractMesh:
  """The mesh's axis names and sizes without devices: enough to derive every sharding (and
  check that it divides the model) before any backend starts."""
  return AbstractMesh((num_workers, *inner_sizes(data, model, expert, context)), AXES)


def axis_size(mesh: Mesh | AbstractMesh, name: str) -> int:
  """The size of axis `name` (1 if the mesh has no such axis)."""
  return dict(mesh.shape).get(name, 1)


def devices_per_worker(mesh: Mesh) -> int:
  return int(np.prod([axis_size(mesh, a) for a in INNER_AXES]))


def process_batch_rows(mesh: Mesh, shape: tuple[int, ...]) -> tuple[tuple[int, ...], slice]:
  """What this process feeds of the global [M, B, ...] batch: its workers (those with a shard on
  its devices) and, when a worker spans processes, the rows of that worker's batch."""
  idx = batch_sharding(mesh).addressable_devices_indices_map(shape).values()
  workers = sorted({w for s in idx for w in range(shape[0])[s[0]]})
  rows = sorted({r for s in idx for r in range(shape[1])[s[1]]})
  return tuple(workers), slice(rows[0], rows[-1] + 1)


def worker_sharding(mesh: Mesh, ndim_after: int = 0) -> NamedSharding:
  """[M, ...] arrays: the leading worker dimension over WORKER, the rest replicated."""
  return NamedSharding(mesh, P(WORKER, *([None] * ndim_after)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[M, B, L] batches: workers over WORKER, each worker's sequences over DATA."""
  return NamedSharding(mesh, P(WORKER, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

