"""The MoE end to end through train.run under Streaming DiLoCo: router statistics and router
agreement reach metrics.jsonl, total vs active parameters the summary; an interrupted run with
the routers on their own sync period resumes bit for bit; bad MoE configs are one sentence."""

import os

import jax
import numpy as np
import pytest

from diloco_jax import checkpoint, train
from diloco_jax import config as config_lib
from tests.test_train import _add_streaming_keys, _rows, streaming_config


def run_cut_at_7_and_resume(cfg, tmp_path):
  """Runs cfg (12 steps) whole and cut after step 7 then resumed; checks the final states are
  bit-identical. Returns (summary whole, summary resumed, workdir whole, workdir cut)."""
  full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
  s_full = train.run(cfg, full)
  train.run(cfg, cut, stop_after=7)
  s_cut = train.run(cfg, cut)
  assert s_cut["steps_this_run"] == 12 - cfg.checkpoint.every_steps
  a = checkpoint.Checkpointer(os.path.join(full, "checkpoints"))
  b = checkpoint.Checkpointer(os.path.join(cut, "checkpoints"))
  (sa, _), (sb, _) = a.restore_saved(12), b.restore_saved(12)
  a.close(), b.close()
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  return s_full, s_cut, full, cut


def moe_config(**overrides):
  base = {"model.moe.num_experts": 4, "model.moe.top_k": 2, "model.moe.ffn_dim": 64,
          "diloco.inner_steps": 6, "diloco.router_sync_every": 2}
  return _add_streaming_keys(streaming_config(**{**base, **overrides}), tau=1)


def test_moe_streaming_run_logs_router_metrics_and_resumes_bit_identically(tmp_path):
  """H=6 with 3 staggered fragments (offsets 0, 2, 4) and the routers every 2 steps, τ=1, E3M0
  with stochastic rounding and error feedback: the checkpoint at step 6 holds two fragments in
  flight (block fragment 0 and the routers, both sent at 6), the residuals and the RNG; the run
  is cut at 7 and resumed from 6. (This is also the streaming resume test of the dense path:
  the checkpointed state does not depend on the model.)"""
  cfg = moe_config(**{"checkpoint.every_steps": 6})
  s_full, s_cut, full, cut = run_cut_at_7_and_resume(cfg, tmp_path)
  assert s_full["final_eval_loss"] == s_cut["final_eval_loss"]
  ra, rb = _rows(full), _rows(cut)
  for x, y in zip(ra, rb, strict=True):   # every value but the wall-clock rate
    x.pop("tokens_per_s"), y.pop("tokens_per_s")
    assert x == y
  last = ra[-1]
  # Per MoE block (both blocks) and averaged; the load histogram sums to 1.
  for block in (0, 1):
    assert sum(last[f"moe/b{block}/load/{e}"] for e in range(4)) == pytest.approx(1.0)
  for key in ("load_balance_loss", "router_z_loss", "load_entropy", "max_load", "dead_experts",
              "dropped_fraction", "router_confidence"):
    assert f"moe/{key}" in last and f"moe/b1/{key}" in last
  assert 0 < last["moe/load_entropy"] <= np.log(4) + 1e-6
  assert 0 < last["router/topk_overlap"] <= 1 and last["router/distance"] > 0
  assert {"outer_grad_norm/3", "outer_grad_cosine/2", "quant_rel_error/1"} <= set(last)
  assert 0 < last["quant_rel_error/1"] < 1
  rc = config_lib.from_config_dict(moe_config())
  n_expert = 3 * 64 * 64   # SwiGLU: gate, up [D, F] and down [F, D], D = F = 64
  assert s_full["num_params"] - s_full["active_params"] == 2 * (4 - 2) * n_expert
  assert s_full["active_flops_per_token"] > 0 and rc.model.moe_blocks == (0, 1)
  # Bits at step 2: only the router fragment sends (the staggered ones first at 6, 8, 10): two
  # [64, 4] routers in E3M0 blocks of 32, 4-bit codes + an fp32 scale each, one all-gather.
  rows = {r["step"]: r for r in ra}
  assert rows[2]["bits_this_step"] == rows[4]["bits_this_step"] == 2 * 8 * (32 * 4 + 32)
  assert s_full["bits_sent_per_worker"] == s_cut["bits_sent_per_worker"]


MOE_BAD = [
    ({"model.moe.top_k": 5}, r"model.moe.top_k=5 must be at most model.moe.num_experts=4$"),
    ({"model.moe.capacity_factor": 0.0},
     r"model.moe.capacity_factor must be a number > 0, got 0.0$"),
    ({"mesh.expert": 3}, r"model.moe.num_experts=4 must be divisible by mesh.expert=3 "),
    ({"mesh.expert": 2, "model.moe.num_experts": 0}, r"mesh.expert=2 needs an MoE model "),
    ({"mesh.expert": 2, "mesh.data": 2, "train.batch_size": 2},
     r"train.batch_size=2 must be divisible by mesh.data \* mesh.expert = 4 "),
    ({"diloco.router_sync_every": 4}, r"diloco.router_sync_every=4 must divide "
     r"diloco.inner_steps \(H=6\) and exceed diloco.overlap_steps \(τ=1\)$"),
    ({"diloco.router_sync_every": 2, "model.moe.num_experts": 0},
     r"diloco.router_sync_every=2 needs an MoE model"),
    ({"model.moe.every": 3}, r"model.moe.every=3 leaves no MoE block among model.num_layers=2"),
    ({"model.moe.dispatch": "sparse"}, r"model.moe.dispatch must be one of \('capacity', "
     r"'dropless'\), got 'sparse'$"),
]


@pytest.mark.parametrize("overrides,message", MOE_BAD)
def test_bad_moe_config_is_one_sentence_naming_the_key(overrides, message):
  with pytest.raises(config_lib.ConfigError, match="^" + message):
    config_lib.from_config_dict(moe_config(**overrides))


def test_an_unknown_moe_key_is_named():
  c = moe_config()
  with c.unlocked():
    c.model.moe.experts = 8
  with pytest.raises(config_lib.ConfigError, match=r"^unknown key model.moe.experts; allowed: "):
    config_lib.from_config_dict(c)
