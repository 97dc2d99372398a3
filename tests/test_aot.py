"""The ahead-of-time memory check: exact state bytes per device from the shardings."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from diloco_jax import aot

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(family="streaming", arg="tiny"):
  spec = importlib.util.spec_from_file_location(f"{family}_cfg",
                                                REPO / "experiments" / "configs" / f"{family}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  c.model.num_layers = 1
  return c


def test_streaming_state_bytes_per_device_are_exact():
  c = _config()
  c.diloco.layers_per_fragment = 1   # P = 2: the block, and the rest
  r = aot.check(c, hbm_gib=1.0)
  n = r["num_params"]
  assert r["mesh"] == {"worker": 4, "data": 1, "expert": 1, "context": 1, "model": 1}
  assert r["devices"] == 4
  # Each device holds one worker's params and AdamW moments (+ two int32 step counters), and a
  # replicated outer copy, Nesterov momentum and in-flight outer gradient (τ = 1), all fp32.
  assert r["state_bytes_per_device"] == {
      "worker params": 4 * n, "inner optimizer state": 2 * 4 * n + 8, "outer params": 4 * n,
      "outer optimizer state": 4 * n, "in-flight outer gradients": 4 * n,
      "quantizer residuals": 0,
      "sync status": 2 * (4 + 4)}   # per fragment: this worker's status and the count k
  assert r["batch_bytes_per_device"] == 8 * 65 * 4   # one worker's [B=8, L+1=65] int32
  assert [p["program"] for p in r["programs"]] == ["inner_step", "restart, fresh inner state",
                                                   "send[0]", "receive[0]", "send[1]",
                                                   "receive[1]"]
  assert r["peak_bytes_per_device"] == (sum(r["state_bytes_per_device"].values())
                                        + r["batch_bytes_per_device"]
                                        + max(p["temp_bytes"] for p in r["programs"]))
  assert set(r["host_state_bytes_per_device"].values()) == {0}
  assert r["state_vs_dp"] == (4 * 4 * n + 2 * 4 * n + 8 + 16) / (3 * 4 * n + 8)   # ≈ 2, τ = 1
  assert r["fits"] is True
  assert aot.check(c, hbm_gib=r["peak_bytes_per_device"] / 2**30 * 0.99)["fits"] is False
  assert "peak estimate" in aot.format_report(r)


def test_data_parallel_and_two_workers_per_device():
  c = _config("diloco")
  c.algorithm = "dp"
  c.diloco.num_workers = 16   # over the 8 simulated test devices: two workers per device
  r = aot.check(c)
  n = r["num_params"]
  assert r["state_bytes_per_device"] == {"params": 4 * n, "optimizer state": 2 * 4 * n + 8}
  assert r["mesh"] == {"worker": 8, "data": 1, "expert": 1, "context": 1, "model": 1}
  assert r["batch_bytes_per_device"] == 2 * 8 * 65 * 4   # two workers' [B=8, L+1=65] int32
  assert "fits" not in r


def test_offloaded_outer_state_is_counted_in_host_memory_and_sharded_state_exactly():
  """FSDP over mesh.data=2 and the outer state offloaded: the device keeps half of the worker's
  params and moments; the outer copy, momentum and in-flight Δ sit in host memory, and each
  send/receive brings only its fragment over (SPEC §2 Memory: 1 + 2/(3P) of data-parallel for
  the outer copy and momentum, + 1/(3P) for the in-flight Δ)."""
  c = _config()
  c.model.num_layers = 2
  c.diloco.layers_per_fragment = 1   # P = 3
  c.diloco.num_workers, c.mesh.data, c.diloco.offload_outer = 2, 2, True
  c.diloco.codec_block_size = 16     # D/2 = 32 values per device run
  r = aot.check(c)
  n = r["num_params"]
  norms = 64 * (2 * 2 + 1) + 16 * 2 * 2   # RMSNorm scales stay whole on every device
  sharded = (n - norms) // 2 + norms
  assert r["state_bytes_per_device"] == {
      "worker params": 4 * sharded, "inner optimizer state": 2 * 4 * sharded + 8,
      "outer params": 0, "outer optimizer state": 0, "in-flight outer gradients": 0,
      "quantizer residuals": 0, "sync status": 3 * 8}
  assert r["host_state_bytes_per_device"] == {
      "worker params": 0, "inner optimizer state": 0, "outer params": 4 * sharded,
      "outer optimizer state": 4 * sharded, "in-flight outer gradients": 4 * sharded,
      "quantizer residuals": 0, "sync status": 0}
  dp = 3 * 4 * sharded + 8
  assert r["state_vs_dp"] == (dp + 24) / dp
  fetched = {p["program"]: p["fetched_bytes"] for p in r["programs"]}
  assert fetched["inner_step"] == 0
  # A send reads θ_g of its fragment; a receive θ_g, the momentum and the in-flight Δ.
  assert all(3 * fetched[f"send[{p}]"] == fetched[f"receive[{p}]"] > 0 for p in range(3))
  assert sum(fetched[f"send[{p}]"] for p in range(3)) == 4 * sharded
  largest = max(fetched.values())
  assert r["state_vs_dp_in_sync"] == (dp + 24 + largest) / dp


def test_bad_config_is_one_sentence():
  out = subprocess.run([sys.executable, "-m", "diloco_jax.aot",
                        "--config=experiments/configs/streaming.py:tiny",
                        "--config.diloco.overlap_steps=99"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("config error: diloco.overlap_steps")
