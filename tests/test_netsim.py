"""The compute-utilization simulator (arXiv 2501.18512 §3.1): hand-computable cases, properties,
the paper's 1B table and the CLI. Numpy only; the whole file runs in a few seconds."""

import json
import subprocess
import sys

import numpy as np
import pytest

from diloco_jax import netsim

# SPEC §4: Gbit/s the paper's simulator needs for 50/80/90/95/99 % utilization, 1B model.
PAPER_1B = {
    "dp": [86.8, 152.6, 184.2, 222.3, 569.0],
    "diloco": [1.4, 6.2, 13.3, 23.3, 86.8],
    "streaming": [1.4, 5.2, 9.1, 16.0, 28.1],
    "streaming_overlap": [1.4, 4.3, 6.2, 9.1, 11.0],
    "streaming_overlap_fp4": [0.4, 0.9, 1.7, 2.0, 3.0],
}


def _grid_index(gbps: float) -> int:
  """Position on numpy.logspace(-1, 3, 50) of a value printed to 0.1 Gbit/s (nearest in log)."""
  return int(np.argmin(np.abs(np.log(netsim.GRID_GBPS) - np.log(gbps))))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "diloco_jax.netsim", *args], capture_output=True,
                        text=True, timeout=60, check=False)


def test_dag_has_4l_minus_1_nodes_and_no_activation_gradient_for_the_first_layer():
  order = netsim.compute_order(4)
  assert len(order) + 4 == 4 * 4 - 1  # compute nodes + one reduction per layer
  assert ("BA", 1) not in order and ("BP", 1) == order[-1]
  assert order[:4] == [("F", 1), ("F", 2), ("F", 3), ("F", 4)]
  assert order.index(("BA", 3)) < order.index(("BP", 2))  # BP_2 needs the gradient BA_3 makes


def test_fragments_are_strided_or_sequential():
  assert netsim.fragment_layers(6, 3, "strided") == [[1, 3, 5], [2, 4, 6]]
  assert netsim.fragment_layers(6, 3, "sequential") == [[1, 2, 3], [4, 5, 6]]
  assert netsim.fragment_layers(6, None) == [[1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("name", netsim.METHODS)
def test_infinite_bandwidth_and_no_latency_is_full_utilization(name):
  u = netsim.simulate(netsim.Workload(1, 1e9, 0.1), netsim.method(name, inner_steps=4), np.inf)
  assert u == pytest.approx(1.0)


def test_one_layer_data_parallel_by_hand():
  # L=1: F_1 and BP_1 (0.5 s each), then R_1 sends N·bits·2(M−1)/M = 1e9·16 bits at 16 Gbit/s
  # = 1 s, plus 2(M−1)·latency; the next F_1 waits for it. Utilization = 1 / (1 + 1 + 2·0.25).
  workload = netsim.Workload(num_layers=1, num_params=1e9, step_time=1.0)
  dp = netsim.method("dp")
  assert netsim.simulate(workload, dp, 16.0) == pytest.approx(1 / 2)
  assert netsim.simulate(workload, dp, 16.0, latency=0.25) == pytest.approx(1 / 2.5)
  # M=4: each worker sends 2·3/4 of the payload: 1.5 s.
  assert netsim.simulate(workload, dp, 16.0, num_workers=4) == pytest.approx(1 / 2.5)


def test_one_layer_diloco_and_overlap_by_hand():
  # H=2, one layer, the reduction takes 2 s against 1 s steps. τ=0: every 2 steps the accelerator
  # waits 2 s, so 2 of 4 s compute. τ=1: step t+1 runs while R is on the wire, so it waits 1 s.
  workload = netsim.Workload(num_layers=1, num_params=2e9, step_time=1.0)
  diloco = netsim.method("diloco", inner_steps=2)
  overlap = netsim.method("streaming_overlap", inner_steps=2, layers_per_fragment=1, tau=1)
  assert netsim.simulate(workload, diloco, 16.0) == pytest.approx(2 / 4)
  assert netsim.simulate(workload, overlap, 16.0) == pytest.approx(2 / 3)


@pytest.mark.parametrize("preset", list(netsim.PRESETS))
def test_utilization_is_monotone_in_bandwidth(preset):
  bw = np.logspace(-2, 4, 120)
  for name in netsim.METHODS:
    u = netsim.simulate(netsim.PRESETS[preset], netsim.method(name), bw)
    assert np.all(np.diff(u) >= -1e-12), name
    assert np.all((u > 0) & (u <= 1 + 1e-12)), name


def test_overlap_never_hurts():
  workload = netsim.PRESETS["1B"]
  bw = netsim.GRID_GBPS
  for lat in (0.0, 0.05):
    us = [netsim.simulate(workload, netsim.method("streaming_overlap", tau=tau), bw, latency=lat)
          for tau in (0, 1, 2, 5, 20)]  # τ=20 > ⌊H/F⌋=12: several fragments in flight
    for slower, faster in zip(us, us[1:]):
      assert np.all(faster >= slower - 1e-12)
    assert np.any(us[1] > us[0] + 0.01)  # and it helps somewhere


def test_fp4_needs_no_more_bandwidth_than_fp32():
  workload = netsim.PRESETS["1B"]
  fp32 = netsim.bandwidth_table(workload, [netsim.method("streaming_overlap", bits=32)])
  fp4 = netsim.bandwidth_table(workload, [netsim.method("streaming_overlap_fp4")])
  for u in netsim.TARGETS:
    assert fp4["streaming_overlap_fp4"][u] <= fp32["streaming_overlap"][u]
  assert fp4["streaming_overlap_fp4"][0.5] < fp32["streaming_overlap"][0.5] / 4


def test_step_time_from_flops():
  assert netsim.step_time_from_flops(6e15, 1e16, 0.6) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="mfu"):
    netsim.step_time_from_flops(6e15, 1e16, 1.5)


def test_paper_1b_table_within_one_grid_step_in_every_cell():
  workload = netsim.PRESETS["1B"]
  table = netsim.bandwidth_table(workload, [netsim.method(m) for m in netsim.METHODS])
  for name, paper in PAPER_1B.items():
    ours = [table[name][u] for u in netsim.TARGETS]
    assert None not in ours, name
    steps = [_grid_index(o) - _grid_index(p) for o, p in zip(ours, paper)]
    assert max(abs(s) for s in steps) <= 1, (name, ours, paper)
  # Not a lookup table: twice the parameters needs about twice the bandwidth.
  double = netsim.Workload(24, 2e9, 0.1)
  diloco2 = netsim.bandwidth_table(double, [netsim.method("diloco")])["diloco"]
  assert _grid_index(diloco2[0.5]) - _grid_index(table["diloco"][0.5]) in (3, 4, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="sgd"), "methods must be among"),
    (dict(name="streaming", layers_per_fragment=0), "layers_per_fragment"),
    (dict(name="streaming_overlap", tau=100), "tau must be smaller"),
    (dict(name="dp", bits=-16), "bits"),
    (dict(name="streaming", pattern="random"), "pattern"),
])
def test_bad_method_arguments_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    netsim.method(**kwargs)


def test_bad_simulation_arguments_name_the_argument():
  workload, dp = netsim.PRESETS["1B"], netsim.method("dp")
  for bw in (0.0, -1.0, [1.0, 0.0], np.nan):
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
      netsim.simulate(workload, dp, bw)
  with pytest.raises(ValueError, match="latency"):
    netsim.simulate(workload, dp, 1.0, latency=-1.0)
  with pytest.raises(ValueError, match="num_workers"):
    netsim.simulate(workload, dp, 1.0, num_workers=1)
  with pytest.raises(ValueError, match="num_layers"):
    netsim.Workload(0, 1e9, 0.1)
  with pytest.raises(ValueError, match="step_time"):
    netsim.Workload(24, 1e9, 0.0)


def test_cli_json_schema():
  out = _run_cli("--preset=1B", "--json")
  assert out.returncode == 0, out.stderr
  table = json.loads(out.stdout)  # exactly one JSON document on stdout
  assert list(table) == list(netsim.METHODS)
  for cells in table.values():
    assert list(cells) == ["50", "80", "90", "95", "99"]
    assert all(isinstance(v, float) and v > 0 for v in cells.values())
    assert list(cells.values()) == sorted(cells.values())


@pytest.mark.parametrize("args, flag", [
    (["--preset=2B"], "--preset"),
    (["--methods=dp,sgd"], "--methods"),
    (["--bandwidth=10,-1"], "--bandwidth"),
    (["--num_layers=0"], "--num_layers"),
    (["--tau=x"], "--tau"),
])
def test_cli_bad_input_is_one_sentence_and_exit_status_2(args, flag):
  out = _run_cli(*args)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and flag in lines[0], out.stderr
  assert out.stdout == ""
