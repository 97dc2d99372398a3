"""Static model hyperparameters (`ModelConfig`) and the paper's preset family (SPEC §4)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from diloco_jax.model.moe import MoEConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MLPS = ("swiglu", "gelu")
REMAT = ("none", "block")
ATTENTIONS = ("dense", "blockwise", "cudnn", "splash", "ring")
ROPE_SCALINGS = ("none", "linear", "yarn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters (hashable, so jit can close over it)."""

  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  ffn_dim: int
  head_dim: int | None = None  # None: d_model // num_heads.
  mlp: str = "swiglu"  # "swiglu" (three matrices) or "gelu" (two).
  tied_embeddings: bool = True  # logits = x @ embed^T, else a separate unembed matrix.
  z_loss: float = 1e-4  # weight of mean(logsumexp(logits)^2) in the loss.
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"  # activation/compute dtype; params are always float32.
  remat: str = "none"  # "block": recompute each block's activations in the backward pass.
  moe: MoEConfig | None = None  # a sparse MoE feed-forward in every moe.every-th block.
  # "dense" ([L, L] scores), "blockwise" (flash-style tiles, pure JAX), "cudnn" (the GPU fused
  # kernel) or "splash" (the Pallas TPU kernel; interpreted, slowly, on other backends).
  attention: str = "dense"
  attention_block: int = 128  # blockwise/splash: positions per tile (must divide the length).
  # RoPE for length (SPEC §6.2; the base itself is rope_base): "linear" is position
  # interpolation (positions / s), "yarn" the per-frequency ramp plus the logit temperature.
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0  # s = L_target / L_train >= 1.
  rope_original_length: int = 0  # yarn: L_train, the length the model was trained at.
  yarn_beta_fast: float = 32.0  # yarn: frequencies turning >= this often in L_train are kept.
  yarn_beta_slow: float = 1.0  # yarn: those turning <= this often are interpolated fully.

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "ffn_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")
    if self.head_dim is None:
      if self.d_model % self.num_heads:
        raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
                         f"({self.num_heads}) when model.head_dim is None")
      object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
    if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"model.head_dim must be an even integer >= 2 (RoPE rotates pairs), "
                       f"got {self.head_dim!r}")
    if self.mlp not in _MLPS:
      raise ValueError(f"model.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
    if self.remat not in REMAT:
      raise ValueError(f"model.remat must be one of {REMAT}, got {self.remat!r}")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if (not isinstance(self.attention_block, int) or isinstance(self.attention_block, bool)
        or self.attention_block < 1):
      raise ValueError(f"model.attention_block must be an integer >= 1, got "
                       f"{self.attention_block!r}")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, got "
                       f"{self.rope_scaling!r}")
    if not isinstance(self.rope_scaling_factor, (int, float)) or self.rope_scaling_factor < 1:
      raise ValueError(f"model.rope_scaling_factor must be a number >= 1, got "
                       f"{self.rope_scaling_factor!r}")
    if self.rope_scaling == "yarn":
      if (not isinstance(self.rope_original_length, int) or self.rope_original_length < 1):
        raise ValueError(f"model.rope_original_length must be an integer >= 1 (the training "
                         f"length) with model.rope_scaling='yarn', got "
                         f"{self.rope_original_length!r}")
      if not 0 <= self.yarn_beta_slow < self.yarn_beta_fast:
        raise ValueError(f"model.yarn_beta_slow ({self.yarn_beta_slow!r}) must be >= 0 and "
                         f"below model.yarn_beta_fast ({self.yarn_beta_fast!r})")
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ValueError(f"model.attention='cudnn' needs model.dtype='bfloat16' (cuDNN's fused "
                       f"attention takes 16-bit inputs only), got {self.dtype!r}")
    for name, ok, allowed in (("z_loss", self.z_loss >= 0, ">= 0"),
                              ("norm_eps", self.norm_eps > 0, "> 0"),
                              ("rope_base", self.rope_base > 1, "> 1")):
      if not ok:
        raise ValueError(f"model.{name} must be {allowed}, got {getattr(self, name)!r}")
    if self.moe is not None:
      if not isinstance(self.moe, MoEConfig):
        raise ValueError(f"model.moe must be a MoEConfig or None, got {self.moe!r}")
      if self.moe.every > self.num_layers:
        raise ValueError(f"model.moe.every={self.moe.every} leaves no MoE block among "
                         f"model.num_layers={self.num_layers}; use at most {self.num_layers}")
      if self.remat == "block" and self.num_layers % self.moe.every:
        raise ValueError(f"model.moe.every={self.moe.every} must divide model.num_layers="
                         f"{self.num_layers} with model.remat='block' (one scan step is a "
                         f"period of blocks)")

  @property
  def moe_blocks(self) -> tuple[int, ...]:
    """The blocks whose feed-forward is the MoE: every moe.every-th, counting from 1 (blocks
    n−1, 2n−1, …, as GShard's every-other-layer), none for a dense model."""
    if self.moe is None:
      return ()
    n = self.moe.every
    return tuple(i for i in range(self.num_layers) if i % n == n - 1)


# Paper family (SPEC §4): FFN = 4*d_model, head dim 64, vocab 32768. The paper's names match the
# parameter counts of a classic two-matrix GELU MLP (12*d_model^2 per layer + embedding: "35M" is
# 35.6M, "1B" is 1.28B); a SwiGLU MLP at FFN = 4*d_model would make "1B" 1.68B, so these use gelu.
_PAPER = {"35M": (6, 512), "100M": (9, 768), "200M": (12, 1024), "300M": (15, 1280),
          "500M": (18, 1536), "1B": (24, 2048), "4B": (36, 3072)}
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, num_layers=2, d_model=64, num_heads=4, ffn_dim=256),
    **{name: dict(vocab_size=32768, num_layers=layers, d_model=d, num_heads=d // 64,
                  ffn_dim=4 * d, mlp="gelu") for name, (layers, d) in _PAPER.items()},
}


def config_from_preset(name: str, **overrides) -> ModelConfig:
  """The preset's ModelConfig with `overrides` (any ModelConfig field) applied."""
  if name not in PRESETS:
    raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {name!r}")
  return ModelConfig(**{**PRESETS[name], **overrides})
