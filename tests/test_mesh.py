"""Meshes on real topologies, checked on fake devices (no hardware): the worker axis goes over
the slow network (TPU slices, GPU nodes, processes) and a worker's data/model axes stay inside."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest

from diloco_jax import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  process_index: int
  platform: str = "tpu"
  device_kind: str = "TPU v4"
  slice_index: int = 0
  coords: tuple = (0, 0, 0)
  core_on_chip: int = 0


def tpu_slices(num_slices: int, shape=(2, 2, 1), chips_per_host: int = 4):
  """`num_slices` TPU v4 slices of `shape` chips each, 4 chips per host (process)."""
  out, n = [], int(np.prod(shape))
  for s in range(num_slices):
    for i, c in enumerate(itertools.product(*(range(k) for k in reversed(shape)))):
      out.append(FakeDevice(id=s * n + i, process_index=(s * n + i) // chips_per_host,
                            slice_index=s, coords=tuple(reversed(c))))
  return out


def gpu_nodes(num_nodes: int, gpus: int):
  return [FakeDevice(id=n * gpus + g, process_index=n, platform="gpu", device_kind="H100")
          for n in range(num_nodes) for g in range(gpus)]


def workers_of(grid, key):
  """{worker index: set of granule keys its devices are on}."""
  return {w: {key(d) for d in grid[w].ravel()} for w in range(grid.shape[0])}


@pytest.mark.parametrize("num_slices,M,data", [(2, 2, 4), (4, 4, 4), (2, 4, 2), (4, 2, 8)])
def test_multislice_puts_the_worker_axis_over_slices(num_slices, M, data):
  devs = tpu_slices(num_slices)
  grid = mesh_lib.device_grid(M, data=data, devices=devs)
  assert grid.shape == (M, data, 1, 1, 1)
  assert sorted(d.id for d in grid.ravel()) == [d.id for d in devs]   # every device once
  per_worker = workers_of(grid, lambda d: d.slice_index)
  span = max(1, num_slices // M)
  for w, slices in per_worker.items():
    assert len(slices) == span   # a worker sits in one slice, or spans num_slices/M of them
  if num_slices <= M:            # workers in different slices only talk over DCN
    k = M // num_slices
    assert [min(per_worker[w]) for w in range(M)] == [w // k for w in range(M)]
  # The data axis stays inside a slice unless a worker spans several.
  for w in range(M):
    data_slices = {d.slice_index for d in grid[w, :, 0, 0, 0]}
    assert len(data_slices) == span


def test_one_slice_follows_the_physical_torus():
  devs = tpu_slices(1, shape=(2, 2, 2), chips_per_host=4)
  grid = mesh_lib.device_grid(2, data=4, devices=devs)
  assert grid.shape == (2, 4, 1, 1, 1) and sorted(d.id for d in grid.ravel()) == list(range(8))
  for w in range(2):   # each worker's 4 chips form a 2x2 face of the 2x2x2 cube
    coords = np.array([d.coords for d in grid[w].ravel()])
    assert sum(len(set(coords[:, i])) == 1 for i in range(3)) == 1


@pytest.mark.parametrize("nodes,gpus,M,data,model", [(2, 8, 2, 8, 1), (4, 8, 4, 4, 2),
                                                      (2, 8, 4, 4, 1), (4, 4, 2, 8, 1)])
def test_gpu_nodes_put_the_worker_axis_across_nodes(nodes, gpus, M, data, model):
  devs = gpu_nodes(nodes, gpus)
  grid = mesh_lib.device_grid(M, data=data, model=model, devices=devs)
  assert grid.shape == (M, data, 1, 1, model)
  assert sorted(d.id for d in grid.ravel()) == list(range(nodes * gpus))
  per_worker = workers_of(grid, lambda d: d.process_index)
  assert all(len(v) == max(1, nodes // M) for v in per_worker.values())
  for w in range(M):   # the model axis never leaves a node
    for i in range(data):
      assert len({d.process_index for d in grid[w, i].ravel()}) == 1


def test_cpu_processes_group_workers_by_process():
  devs = [FakeDevice(id=p * 2 + i, process_index=p, platform="cpu", device_kind="cpu")
          for p in range(2) for i in range(2)]
  grid = mesh_lib.device_grid(4, devices=devs)
  assert [d.process_index for d in grid.ravel()] == [0, 0, 1, 1]


@pytest.mark.parametrize("devs,M,data,match", [
    (tpu_slices(3), 2, 4, "M=2 workers cannot be spread evenly over 3 slices"),
    (tpu_slices(2), 2, 2, "each slice has 4 devices but its 1 worker.* fill 2"),
    (gpu_nodes(4, 4), 2, 4, "each worker spans 2 processes, so mesh.data must be 8"),
])
def test_bad_topologies_name_the_fix(devs, M, data, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.device_grid(M, data=data, devices=devs)


def test_simulated_cpu_devices_unchanged():
  grid = mesh_lib.device_grid(4, devices=jax.devices()[:8])
  assert grid.shape == (4, 1, 1, 1, 1) and [d.id for d in grid.ravel()] == [0, 1, 2, 3]
  grid = mesh_lib.device_grid(8, data=2, devices=jax.devices()[:8])   # 4 x 2: two workers/device
  assert grid.shape == (4, 2, 1, 1, 1)
  m = mesh_lib.make_mesh(4)
  assert mesh_lib.process_batch_rows(m, (4, 6, 9)) == ((0, 1, 2, 3), slice(0, 6))
  assert mesh_lib.process_batch_rows(mesh_lib.make_mesh(8), (8, 2, 9)) == (tuple(range(8)),
                                                                          slice(0, 2))
