"""Streaming DiLoCo family (SPEC §2-3, Algorithm 2): fragments synced one after another, each
sync overlapped with τ inner steps and merged with α, outer gradients sent as 4-bit floats.

Run book:
  tiny (the README's main job; 2 CPU cores, ~1-2 minutes, 4 simulated workers, synthetic data):
    python -m diloco_jax.main --config=experiments/configs/streaming.py:tiny --workdir=runs/streaming
    Summary: final eval loss next to the entropy floor, bits sent per worker next to what
    data-parallel training of the same model would send (about 100x more at these settings).
  paper (Streaming DiLoCo's main setting: M=2, strided 3-block fragments, τ=1, E3M0, H=100,
    outer lr 0.4) on the 35M model; needs an accelerator and a text corpus:
    ... --config=experiments/configs/streaming.py:paper --config.data.paths="('corpus/*.txt',)"
  ablations: --config.diloco.overlap_steps=5, --config.diloco.merge_alpha=0.0,
    --config.diloco.codec=fp32, --config.diloco.fragment_pattern=sequential,
    --config.diloco.worker_overlap_steps="(1, 4)" (heterogeneous slack), --config.diloco.wire=packed.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "diloco_family", os.path.join(os.path.dirname(os.path.abspath(__file__)), "diloco.py"))
_diloco = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_diloco)


def get_config(arg: str = "tiny"):
  c = _diloco.get_config("35m" if arg == "paper" else "tiny")
  c.algorithm = "streaming"
  c.diloco.layers_per_fragment = 3      # transformer blocks per fragment (P = L/this + 1)
  c.diloco.fragment_pattern = "strided"  # "strided" (paper default) or "sequential"
  c.diloco.overlap_steps = 1            # τ, inner steps a fragment is on the wire (0 <= τ < H)
  c.diloco.worker_overlap_steps = ()    # optional τ per worker (heterogeneous slack)
  c.diloco.merge_alpha = 0.5            # α: θ_m <- α θ_m + (1-α) θ_g at the merge
  c.diloco.codec = "fp4_e3m0"           # "fp32", "bf16", "fp8_e4m3", "fp4_e2m1", "fp4_e3m0"
  c.diloco.codec_block_size = 32        # values per quantization scale
  c.diloco.stochastic_rounding = False  # unbiased stochastic instead of nearest rounding
  c.diloco.error_feedback = False       # add each worker's quantization residual to its next Δ
  c.diloco.wire = "reference"           # "reference" (fp32 psum of dequantized) or "packed"
  if arg == "tiny":
    c.model.num_layers = 4
    c.diloco.layers_per_fragment = 2    # P = 2 block fragments + the non-block one = 3
    c.diloco.inner_steps = 30           # each fragment syncs every 30 steps, some fragment every 10
  elif arg == "paper":
    c.diloco.inner_steps = 100
    c.diloco.outer_lr = 0.4
  else:
    raise ValueError(f"config argument must be 'tiny' or 'paper', got {arg!r}")
  return c
