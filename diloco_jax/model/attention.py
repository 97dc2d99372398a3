"""Causal multi-head self-attention with QK-norm and rotary positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from diloco_jax.model.blockwise import blockwise_attention
from diloco_jax.model.config import ModelConfig
from diloco_jax.model.layers import RMSNorm, _no_constraint, _normal, _rope


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
    L = x_BxLxD.shape[1]
    if self.cfg.attention == "blockwise":
      block = min(self.cfg.attention_block, L)
      if L % block:
        raise ValueError(f"model.attention_block={block} must divide the sequence length {L}")
      o_BxLxHxK = heads(blockwise_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, block))
    else:
      s_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                             preferred_element_type=jnp.float32) * self.cfg.head_dim**-0.5
      causal_LxL = jnp.tril(jnp.ones((L, L), bool))
      s_BxHxLxL = jnp.where(causal_LxL, s_BxHxLxL, jnp.finfo(jnp.float32).min)
      p_BxHxLxL = jax.nn.softmax(s_BxHxLxL, axis=-1).astype(dt)  # softmax in float32
      o_BxLxHxK = heads(jnp.einsum("bhqs,bshk->bqhk", p_BxHxLxL, v_BxLxHxK))
    out_BxLxD = jnp.einsum("blhk,hkd->bld", o_BxLxHxK, self.wo[...].astype(dt))
    return constrain(out_BxLxD, ("batch", None, None))
