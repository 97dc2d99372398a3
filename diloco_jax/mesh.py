"""Device meshes with the axis names WORKER, DATA and MODEL.

The worker axis carries the DiLoCo replicas (M). On CPU the devices are simulated XLA host
devices; on a multislice TPU the worker axis is the slow data-centre-network axis. Only this
module spells the axis names.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

WORKER = "worker"
DATA = "data"
MODEL = "model"
AXES = (WORKER, DATA, MODEL)


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
  os.environ["XLA_FLAGS"] = " ".join(flags)
  jax.config.update("jax_num_cpu_devices", n)


def worker_axis_size(num_workers: int, num_devices: int, data: int = 1, model: int = 1) -> int:
  """The largest divisor of M whose mesh fits the devices: more workers than devices still works,
  the leading worker dimension is then only partly sharded (several workers per device)."""
  fit = max(1, num_devices // (data * model))
  return max(d for d in range(1, num_workers + 1) if num_workers % d == 0 and d <= fit)


def make_mesh(num_workers: int, data: int = 1, model: int = 1, devices=None) -> Mesh:
  """A (worker, data, model) mesh for M workers over the given (default: all) devices."""
  devices = list(jax.devices() if devices is None else devices)
  w = worker_axis_size(num_workers, len(devices), data, model)
  n = w * data * model
  if n > len(devices):
    raise ValueError(f"mesh needs data*model={data * model} devices per worker but only "
                     f"{len(devices)} devices exist")
  return Mesh(np.asarray(devices[:n]).reshape(w, data, model), AXES)


def worker_sharding(mesh: Mesh, ndim_after: int = 0) -> NamedSharding:
  """[M, ...] arrays: the leading worker dimension over WORKER, the rest replicated."""
  return NamedSharding(mesh, P(WORKER, *([None] * ndim_after)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[M, B, L] batches: workers over WORKER, each worker's sequences over DATA."""
  return NamedSharding(mesh, P(WORKER, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

