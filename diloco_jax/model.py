"""Decoder-only transformer (Flax NNX) with a pure apply on a params pytree.

The paper's model family (SPEC §4): pre-norm blocks of causal self-attention with QK-norm and
rotary positions, an MLP, RMSNorm everywhere, no biases, z-loss on the logits. The NNX module
defines the maths; the rest of the framework only sees `init_params` / `apply` / `loss_fn` on a
plain nested dict, so DiLoCo can vmap it over workers and slice it into fragments.

Params layout (the fragmenter keys on it): `params["blocks"][i]` for i = 0..num_layers-1 holds
block i; `embed`, `final_norm` and (untied only) `unembed` sit outside "blocks". Layers are
deliberately not scanned/stacked, so a fragment is a set of whole sub-dicts.

Sharding: `logical_axes(params)` names every dimension of every leaf (`vocab`, `embed`, `heads`,
`head_dim`, `mlp`, `norm`); `sharding.py` maps those names onto mesh axes. Activations are
named through the `constrain(x, names)` hook that `apply`/`loss_fn` take (default: none), so
the partitioner is told, not left to guess, where the batch, heads and MLP dimensions live.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MLPS = ("swiglu", "gelu")
REMAT = ("none", "block")

# The logical name of every dimension of every parameter, keyed on the leaf's own name (the last
# entry of its path). Norm scales are tiny and stay replicated ("norm").
LOGICAL_AXES = {
    "embed": ("vocab", "embed"),                 # [V, D]
    "unembed": ("embed", "vocab"),               # [D, V]
    "wq": ("embed", "heads", "head_dim"),        # [D, H, K]
    "wk": ("embed", "heads", "head_dim"),
    "wv": ("embed", "heads", "head_dim"),
    "wo": ("heads", "head_dim", "embed"),        # [H, K, D]
    "w_gate": ("embed", "mlp"),                  # [D, F]
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),                  # [F, D]
    "scale": ("norm",),                          # RMSNorm scales [D] or [K]
}


def _no_constraint(x: jax.Array, names: tuple) -> jax.Array:
  del names
  return x


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
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    for name, ok, allowed in (("z_loss", self.z_loss >= 0, ">= 0"),
                              ("norm_eps", self.norm_eps > 0, "> 0"),
                              ("rope_base", self.rope_base > 1, "> 1")):
      if not ok:
        raise ValueError(f"model.{name} must be {allowed}, got {getattr(self, name)!r}")


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


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> nnx.Param:
  """A float32 normal init. Hidden matrices use std 1/sqrt(fan_in) so activations keep unit scale."""
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale over the last axis, computed in float32 for stability."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def _rope(x_BxLxHxK: jax.Array, base: float) -> jax.Array:
  """Rotates pairs (x[i], x[i + K/2]) by angle pos * base^(-2i/K): q.k then depends on offset only."""
  L, K = x_BxLxHxK.shape[1], x_BxLxHxK.shape[3]
  freq_F = base ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
  angle_LxF = jnp.arange(L, dtype=jnp.float32)[:, None] * freq_F[None, :]
  sin, cos = jnp.sin(angle_LxF)[None, :, None, :], jnp.cos(angle_LxF)[None, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with QK-norm (per head) and rotary positions."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.cfg = cfg  # weights: wq/wk/wv [D, H, K], wo [H, K, D]
    self.wq = _normal(rngs, (D, H, K), D**-0.5)
    self.wk = _normal(rngs, (D, H, K), D**-0.5)
    self.wv = _normal(rngs, (D, H, K), D**-0.5)
    self.wo = _normal(rngs, (H, K, D), (H * K) ** -0.5)
    # QK-norm bounds the attention logits, which keeps large-model training stable.
    self.q_norm = RMSNorm(K, cfg.norm_eps)
    self.k_norm = RMSNorm(K, cfg.norm_eps)

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint) -> jax.Array:
    dt = x_BxLxD.dtype
    heads = lambda y: constrain(y, ("batch", None, "heads", None))
    q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq[...].astype(dt))
    k_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wk[...].astype(dt))
    v_BxLxHxK = heads(jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wv[...].astype(dt)))
    q_BxLxHxK, k_BxLxHxK = heads(q_BxLxHxK), heads(k_BxLxHxK)
    q_BxLxHxK = _rope(self.q_norm(q_BxLxHxK), self.cfg.rope_base)
    k_BxLxHxK = _rope(self.k_norm(k_BxLxHxK), self.cfg.rope_base)
    s_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                           preferred_element_type=jnp.float32) * self.cfg.head_dim**-0.5
    L = x_BxLxD.shape[1]
    causal_LxL = jnp.tril(jnp.ones((L, L), bool))
    s_BxHxLxL = jnp.where(causal_LxL, s_BxHxLxL, jnp.finfo(jnp.float32).min)
    p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(dt)  # softmax in float32
    o_BxLxHxK = heads(jnp.einsum("bhqs,bshk->bqhk", p_BxHxLxL, v_BxLxHxK))
    out_BxLxD = jnp.einsum("blhk,hkd->bld", o_BxLxHxK, self.wo[...].astype(dt))
    return constrain(out_BxLxD, ("batch", None, None))


class Mlp(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up)); GELU: out(gelu(x @ in))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.ffn_dim
    self.gated = cfg.mlp == "swiglu"  # weights: w_gate/w_up [D, F], w_down [F, D]
    if self.gated:
      self.w_gate = _normal(rngs, (D, F), D**-0.5)
    self.w_up = _normal(rngs, (D, F), D**-0.5)
    self.w_down = _normal(rngs, (F, D), F**-0.5)

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint) -> jax.Array:
    dt = x_BxLxD.dtype
    mlp = lambda y: constrain(y, ("batch", None, "mlp"))
    h_BxLxF = mlp(x_BxLxD @ self.w_up[...].astype(dt))
    if self.gated:
      h_BxLxF = jax.nn.silu(mlp(x_BxLxD @ self.w_gate[...].astype(dt))) * h_BxLxF
    else:
      h_BxLxF = jax.nn.gelu(h_BxLxF)
    return constrain(h_BxLxF @ self.w_down[...].astype(dt), ("batch", None, None))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x_BxLxD: jax.Array, constrain=_no_constraint) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), constrain)
    return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD), constrain)


class Transformer(nnx.Module):
  """tokens [B, L] int -> logits [B, L, V] float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # Vocabulary-facing matrices use std 0.02 (GPT-2 style) so the initial logits are small and
    # the loss at init is close to log(vocab); the pre-norm blocks make the input scale irrelevant.
    self.embed = _normal(rngs, (cfg.vocab_size, cfg.d_model), 0.02)  # [V, D]
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    if not cfg.tied_embeddings:
      self.unembed = _normal(rngs, (cfg.d_model, cfg.vocab_size), 0.02)  # [D, V]

  def __call__(self, tokens_BxL: jax.Array, constrain=_no_constraint) -> jax.Array:
    dt = _DTYPES[self.cfg.dtype]
    # The lookup reads whole rows: gather from the table whole (under FSDP/TP it is all-gathered
    # like every other weight); XLA cannot gather from a vocab-sharded table without first
    # replicating it anyway.
    table_VxD = constrain(self.embed[...], (None, None))
    x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(dt)
    x_BxLxD = constrain(x_BxLxD, ("batch", None, None))
    if self.cfg.remat == "block":
      x_BxLxD = self._scan_blocks(x_BxLxD, constrain)
    else:
      for block in self.blocks:
        x_BxLxD = block(x_BxLxD, constrain)
    x_BxLxD = self.final_norm(x_BxLxD)
    w_DxV = self.embed[...].T if self.cfg.tied_embeddings else self.unembed[...]
    # Accumulate in float32: the softmax over 32k classes and the z-loss need full precision.
    logits = jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV.astype(dt),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", None, "vocab"))


  def _scan_blocks(self, x_BxLxD: jax.Array, constrain) -> jax.Array:
    """The blocks as a scan over their stacked weights, each step under jax.checkpoint: the
    backward pass keeps only each block's input and recomputes the rest. (Unrolled blocks
    under jax.checkpoint do not save memory on XLA: its scheduler is free to run every
    recomputation early, which XLA:CPU does; a scan's loop orders them.) The params stay one
    dict per block (fragments are made of whole blocks): stacking them costs one copy of the
    blocks' weights, sharded like the weights themselves."""
    graphdef, _ = nnx.split(self.blocks[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in self.blocks])

    def body(x, state):
      return nnx.merge(graphdef, state)(x, constrain), None

    return jax.lax.scan(jax.checkpoint(body), x_BxLxD, stacked)[0]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """A fresh params pytree: a plain nested dict of float32 arrays (see the module docstring)."""
  _, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=rng)))
  return nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig):
  """The module's graph definition and an allocation-free state, built once per config."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def apply(cfg: ModelConfig, params: dict, tokens_BxL: jax.Array,
          constrain=_no_constraint) -> jax.Array:
  """Pure forward pass: logits [B, L, V] float32. Safe under jit, vmap and grad.

  `constrain(x, names)` is called on the activations with one logical name (or None) per
  dimension, e.g. ("batch", None, "heads", None); `sharding.activation_constraint` turns it
  into sharding constraints for a mesh.
  """
  graphdef, abstract_state = _abstract(cfg)
  state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy: the cached one is never filled
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)(tokens_BxL, constrain)


def loss_fn(cfg: ModelConfig, params: dict, batch: jax.Array,
            constrain=_no_constraint) -> tuple[jax.Array, dict]:
  """Next-token loss on batch [B, L+1]: mean cross-entropy + z_loss * mean(logsumexp^2)."""
  inputs_BxL, targets_BxL = batch[:, :-1], batch[:, 1:]
  logits_BxLxV = apply(cfg, params, inputs_BxL, constrain)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  ce = jnp.mean(lse_BxL - target_logit_BxL)
  # z-loss pulls log Z towards 0, which keeps the logits from drifting (stability at scale).
  z = cfg.z_loss * jnp.mean(lse_BxL**2)
  return ce + z, {"ce": ce, "z_loss": z}


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes only (no allocation, fast even for the 4B config)."""
  shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(shapes))


def logical_axes(params: dict) -> dict:
  """The logical axis names of every leaf of a params tree (arrays or ShapeDtypeStructs), a
  tree of tuples with one name per dimension (see LOGICAL_AXES)."""
  def names(path, leaf):
    key = _key_name(path[-1])
    if key not in LOGICAL_AXES or len(LOGICAL_AXES[key]) != len(leaf.shape):
      raise ValueError(f"no logical axes for the parameter {jax.tree_util.keystr(path)} of "
                       f"shape {tuple(leaf.shape)}")
    return LOGICAL_AXES[key]
  return jax.tree_util.tree_map_with_path(names, params)


def _key_name(entry) -> object:
  """The raw key of one path entry (dict key or sequence index)."""
  return getattr(entry, "key", getattr(entry, "idx", entry))
