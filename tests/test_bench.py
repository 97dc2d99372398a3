"""experiments/bench.py --quick --json runs and reports a complete, sane JSON document, and the
state bytes it measures from the arrays' shards are exactly what our state holds, counted by hand.

Nothing here asserts a timing (benchmarks print ratios; DESIGN "Tests"). The bench sets its own
simulated device count, so it runs in a fresh interpreter, as a user would run it.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
from fractions import Fraction

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("dp", "diloco", "streaming")
LAYOUTS = {"replicated": (1, 1), "fsdp": (4, 1), "fsdp_tp": (2, 2)}   # (mesh.data, mesh.model)


@pytest.fixture(scope="module")
def report():
  # conftest's XLA flags are inherited (this checks the report, not speed, and most of the run
  # is compiling the three methods' programs); the bench's mesh.set_cpu_device_count replaces
  # the device count in them with its own (one per worker, and 8 for the layouts section).
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "experiments/bench.py", "--quick", "--json"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
  return json.loads(proc.stdout)


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_throughput_and_ratios_are_positive_and_finite(report):
  for kind in ("period", "inner"):
    for m in METHODS:
      entry = report["throughput"][kind][m]
      for key in ("samples", "cpu_samples"):   # wall clock, and per CPU-second of this process
        assert len(entry[key]) == report["settings"]["repeats"], (kind, m, key)
        assert all(_positive(x) for x in entry[key]), (kind, m, key, entry)
      assert _positive(entry["tokens_per_s"]) and _positive(entry["tokens_per_cpu_s"])
      for r in (kind, kind + "_cpu"):
        assert _positive(report["throughput_ratio"][r][m]), (r, m)
    assert report["throughput_ratio"][kind]["dp"] == 1.0
  goal = report["goal"]
  assert goal["min_ratio"] == 0.95
  assert goal["met"] is (goal["streaming_period_ratio"] >= 0.95)
  # A period is a whole number of H-step blocks, so every send and receive is in it.
  assert report["throughput"]["period_steps"] % report["settings"]["inner_steps"] == 0


def test_compile_lists_every_program_of_each_method(report):
  P = report["streaming"]["num_fragments"]
  names = {m: [p["name"] for p in report["compile"][m]["programs"]] for m in METHODS}
  assert names["dp"] == ["step"]
  # The restart of quarantined workers (a no-op unless a Δ is non-finite), then one fragment
  # at τ = 0.
  restart = "restart, fresh inner state"
  assert names["diloco"] == ["inner_step", restart, "sync[0]"]
  # τ >= 1: a send and a receive per fragment, off the inner step's path.
  assert names["streaming"] == ["inner_step", restart] + [f"{k}[{p}]" for p in range(P)
                                                          for k in ("send", "receive")]
  for m in METHODS:
    c = report["compile"][m]
    assert _positive(c["lower_s"]) and _positive(c["compile_s"]), (m, c)
    for p in c["programs"]:
      assert p["memory"] is not None and p["memory"]["argument"] > 0, (m, p)


def _tiny_param_count(model: dict) -> int:
  """The tiny preset's parameters by hand: SwiGLU MLP, tied embeddings, QK-norm, no biases."""
  V, D, F, L = model["vocab_size"], model["d_model"], model["ffn_dim"], model["num_layers"]
  assert model["preset"] == "tiny" and model["mlp"] == "swiglu"
  K = D // 4                                 # head dim: d_model / 4 heads
  block = (4 * D * D                         # wq, wk, wv [D, heads, K] and wo [heads, K, D]
           + 2 * K                           # q_norm, k_norm
           + 3 * D * F                       # w_gate, w_up [D, F] and w_down [F, D]
           + 2 * D)                          # attn_norm, mlp_norm
  return V * D + L * block + D               # embedding (tied) + blocks + final_norm


def _tiny_norm_count(model: dict) -> int:
  """The RMSNorm scales of the tiny preset: q_norm, k_norm [head dim], attn_norm, mlp_norm [D]
  per block, and final_norm [D]."""
  D, L = model["d_model"], model["num_layers"]
  return L * (2 * (D // 4) + 2 * D) + D


def test_state_bytes_are_what_the_state_holds(report):
  N = report["model"]["num_params"]
  assert N == _tiny_param_count(report["model"])
  assert report["devices"]["workers_per_device"] == 1
  mem = report["memory"]
  # Data-parallel, every device: params (4N bytes, fp32), AdamW's two moments (8N), and three
  # int32 counters: the step, Adam's count and the learning-rate schedule's count.
  dp = 12 * N + 12
  # DiLoCo, every device (one worker each): the same for its worker, plus the outer copy θ_g
  # (4N) and the Nesterov momentum (4N), and the PRNG key (two uint32).
  # And per fragment its last sync's status (this worker's, fp32) and count of workers in it.
  P = report["streaming"]["num_fragments"]
  diloco = dp + 8 * N + 8 + 8
  # Streaming DiLoCo with τ >= 1 also keeps every fragment's in-flight Δ in fp32 (4N in all):
  # nothing is offloaded to the host.
  streaming = diloco + 4 * N + 8 * (P - 1)
  assert mem["dp"]["total"] == dp
  assert mem["diloco"]["total"] == diloco
  assert mem["streaming"]["total"] == streaming
  for m in METHODS:
    assert set(mem[m]["per_device"]) == {mem[m]["total"]}, m   # every device holds the same
    assert sum(mem[m]["fields"].values()) == mem[m]["total"], m
  assert mem["diloco"]["fields"]["outer_opt_state"] == 4 * N
  assert mem["streaming"]["fields"]["inflight"] == 4 * N
  assert mem["diloco"]["fields"]["status"] == 8 and mem["streaming"]["fields"]["status"] == 8 * P
  # 20N + 20 over 12N + 12: the paper's 5/3 holds exactly, counters included (and the 8 bytes
  # of sync status apart).
  assert Fraction(mem["diloco"]["total"] - 8, mem["dp"]["total"]) == Fraction(5, 3)
  assert mem["diloco"]["ratio_vs_dp"] == pytest.approx((20 * N + 28) / (12 * N + 12), rel=1e-12)
  assert mem["streaming"]["ratio_vs_dp"] == pytest.approx(streaming / dp, rel=1e-12)
  # Offloading would keep only the largest fragment's outer state and in-flight Δ on device.
  largest = max(report["streaming"]["fragment_numel"])
  assert sum(report["streaming"]["fragment_numel"]) == N
  assert mem["streaming_offloaded_estimate"] == streaming - 12 * N + 12 * largest
  for m in METHODS:
    assert mem[m]["peak_estimate"] >= mem[m]["total"] + mem["batch_bytes_per_device"]


def test_flops_against_the_matmul_reference(report):
  fl = report["flops"]
  assert _positive(fl["matmul"]["flops_per_s"])
  tokens = report["tokens_per_step"]
  N = report["model"]["num_params"]
  for m in METHODS:
    f = fl[m]
    for key in ("achieved_flops_per_s", "fraction_of_matmul", "six_n_flops_per_s",
                "six_n_fraction_of_matmul"):
      assert _positive(f[key]), (m, key, f)
    # XLA's count includes attention and the elementwise work, 6·N·tokens only the weight
    # matmuls of forward and backward: it must not be smaller, nor wildly larger here.
    ratio = f["cost_analysis_flops_per_step"] / (6 * N * tokens)
    assert 1.0 <= ratio < 3.0, (m, ratio)
  # DiLoCo's and Streaming DiLoCo's inner steps are one program: XLA counts the same FLOPs.
  assert fl["diloco"]["cost_analysis_flops_per_step"] == \
      fl["streaming"]["cost_analysis_flops_per_step"]


def test_layouts_divide_each_workers_state_by_data_times_model(report):
  """Streaming DiLoCo (M=2) replicated, FSDP and FSDP+TP inside a worker: the bytes each device
  holds are exact; the throughput ratios are only checked to be numbers."""
  lay = report["layouts"]
  assert report["settings"]["layouts"] is True
  assert lay["workers"] == 2 and lay["codec_block_size"] == 16
  rows = lay["rows"]
  assert list(rows) == list(LAYOUTS)
  N, norms = report["model"]["num_params"], _tiny_norm_count(report["model"])
  for name, (data, model) in LAYOUTS.items():
    row, n = rows[name], data * model
    assert (row["data"], row["model"], row["devices"]) == (data, model, 2 * n), name
    # Every matrix is split data·model ways; only the RMSNorm scales stay whole on a device.
    assert (N - norms) % n == 0
    assert row["numel_whole"] == (N if n == 1 else norms), name
    params = 4 * ((N - norms) // n + norms)   # fp32 bytes of one worker's params, per device
    mem = row["memory"]
    assert mem["fields"]["local_params"] == params, name       # one worker per device
    assert mem["fields"]["outer_params"] == params, name       # replicated over workers
    assert mem["fields"]["outer_opt_state"] == params, name    # Nesterov's trace
    assert mem["fields"]["inflight"] == params, name           # τ = 1: every fragment's Δ
    # AdamW's two moments, and its count and the schedule's count of this device's worker.
    assert mem["fields"]["inner_opt_state"] == 2 * params + 8, name
    # + step, the PRNG key and each fragment's sync status (this worker's, and the count)
    assert mem["fields"]["status"] == 8 * report["streaming"]["num_fragments"], name
    assert mem["total"] == 6 * params + 4 + 8 + 8 + mem["fields"]["status"], name
    assert sum(mem["fields"].values()) == mem["total"], name
    assert mem["per_device"] == [mem["total"]] * row["devices"], name
    assert mem["ratio"] == pytest.approx(mem["total"] / rows["replicated"]["memory"]["total"])
    # The inner step's arguments: the state's worker fields, the step and this device's rows of
    # the [B, L+1] int32 batch, all divided but the norm scales and counters.
    batch_rows = lay["batch_size"] // data * (lay["seq_len"] + 1) * 4
    args = mem["fields"]["local_params"] + mem["fields"]["inner_opt_state"] + 4 + batch_rows
    assert row["inner_step_argument_bytes"] == args, (name, row)
    assert row["inner_step_argument_ratio"] == pytest.approx(
        args / rows["replicated"]["inner_step_argument_bytes"]), (name, row)
    for key in ("samples", "cpu_samples"):
      assert len(row[key]) == report["settings"]["repeats"], (name, key)
      assert all(_positive(x) for x in row[key]), (name, key, row[key])
    assert _positive(row["ratio"]) and _positive(row["ratio_cpu"]), (name, row)
  assert rows["replicated"]["ratio"] == rows["replicated"]["ratio_cpu"] == 1.0
  assert rows["replicated"]["memory"]["fields"]["local_params"] == 4 * N


def test_attention_section_dense_holds_the_scores_and_blockwise_grows_linearly(report):
  """One layer's forward+backward (SPEC §6.2): the dense program's temporaries hold at least one
  [B, H, L, L] fp32 score matrix, blockwise's stay below dense's and grow linearly in L (no
  [L, L] buffer); the timing is only checked to be numbers."""
  att = report["attention"]
  assert att["implementations"][:2] == ["dense", "blockwise"]
  lengths = report["settings"]["attention_lengths"]
  assert [row["seq_len"] for row in att["rows"]] == lengths and len(lengths) >= 2
  B, H, K = att["batch"], att["heads"], att["head_dim"]
  for row in att["rows"]:
    L = row["seq_len"]
    for name in att["implementations"]:
      assert row[name]["argument"] == 4 * B * L * H * K * 4, (name, row)   # q, k, v, dO fp32
    assert row["dense"]["temp"] >= B * H * L * L * 4, row
    assert 0 < row["blockwise"]["temp"] < row["dense"]["temp"], row
  (short, long), grow = (att["rows"][0], att["rows"][-1]), lengths[-1] / lengths[0]
  assert long["blockwise"]["temp"] / short["blockwise"]["temp"] <= 1.25 * grow
  assert long["dense"]["temp"] / short["dense"]["temp"] > 1.5 * grow
  timed = att["timed"]
  assert timed["seq_len"] == report["settings"]["attention_timed_length"]
  for name in att["implementations"]:
    assert len(timed["samples_s"][name]) == min(report["settings"]["repeats"], 5), name
    assert all(_positive(x) for x in timed["samples_s"][name]), name
    assert _positive(timed["dense_over"][name]), name
  assert timed["dense_over"]["dense"] == 1.0


def test_torch_section_is_skipped_in_one_line_or_checks_the_same_loss(report):
  """Without torch (the project's own venv) the report says why in one line; with it, both
  implementations computed the same loss before being timed."""
  tr = report["torch"]
  if "skipped" in tr:
    assert "torch" in tr["skipped"] and "\n" not in tr["skipped"], tr
    return
  assert len(tr["our_losses"]) == len(tr["torch_losses"]) >= 1
  assert tr["max_loss_diff"] < 1e-4, tr
  for name in ("ours", "torch"):
    assert all(_positive(x) for x in tr["samples_s"][name]["cpu"]), (name, tr)
  assert _positive(tr["ours_over_torch"]["cpu"]) and _positive(tr["ours_over_torch"]["wall"])
