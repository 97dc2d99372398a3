"""Sparse mixture-of-experts decoder (SPEC §6.1) trained with Streaming DiLoCo, and its dense
baseline with the same active parameters.

Run book (2 CPU cores; byte-level english-pd text, see ../shared/data/english-pd):
  tiny: E=8 experts, top-2, an MoE feed-forward in every block, per-expert hidden size F/2 so
    the two experts a token uses hold as many parameters as the dense model's MLP (hidden F):
    python -m diloco_jax.main --config=experiments/configs/moe.py:tiny --workdir=runs/moe
  tiny_dense: that dense model (same attention, embedding, active FFN parameters):
    python -m diloco_jax.main --config=experiments/configs/moe.py:tiny_dense --workdir=runs/dense
  data-parallel twins: --config.algorithm=dp; expert parallelism inside each worker:
    --config.mesh.expert=2 (E/2 experts per device, tokens exchanged by all-to-all);
    routers synced more often than the experts: --config.diloco.router_sync_every=10.
  35m / 1b: the paper family's 35M and 1B models with E=8, top-2 MoE in every other block
    (GShard), for the ahead-of-time memory check, e.g.
    python -m diloco_jax.aot --config=experiments/configs/moe.py:1b --config.mesh.data=4 \
        --config.mesh.expert=2 --devices=16 --hbm_gib=16

Results and the commands behind them: docs/results/moe.md (experiments/moe.py).
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "streaming_family", os.path.join(os.path.dirname(os.path.abspath(__file__)), "streaming.py"))
_streaming = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_streaming)

ENGLISH_PD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                          "shared", "data", "english-pd", "*.txt")
ARGS = ("tiny", "tiny_dense", "35m", "1b")


def get_config(arg: str = "tiny"):
  if arg not in ARGS:
    raise ValueError(f"config argument must be one of {ARGS}, got {arg!r}")
  if arg in ("tiny", "tiny_dense"):
    c = _streaming.get_config("tiny")
    c.diloco.num_workers = 2            # M=2, τ=1, α=0.5, E3M0 (the Streaming DiLoCo default)
    c.diloco.outer_lr = 0.4
    c.data.source = "text"
    c.data.paths = (ENGLISH_PD,)
    c.data.seq_len = 64
    c.model.num_layers = 4
    c.model.tied_embeddings = False
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.ffn_dim = 256               # the dense MLP; each expert gets half of it
    c.train.batch_size = 8
    c.train.num_steps = 600
    c.train.log_every = 30
    c.eval.every_steps = 60
    c.checkpoint.every_steps = 150
    if arg == "tiny":
      c.model.moe.num_experts = 8
      c.model.moe.top_k = 2
      c.model.moe.ffn_dim = 128         # top-2 × 128 = the dense 256: equal active FFN params
    return c
  c = _streaming.get_config("paper")
  c.model.preset = "35M" if arg == "35m" else "1B"
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.every = 2
  c.model.moe.ffn_dim = c.model.ffn_dim   # 0: the preset's FFN per expert (GShard/Switch)
  c.model.remat = "block"
  return c
