"""The dense feed-forward block (SwiGLU or GELU)."""

from __future__ import annotations

import jax
from flax import nnx

from diloco_jax.model.config import ModelConfig
from diloco_jax.model.layers import _no_constraint, _normal, dense


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
    mlp = lambda y: constrain(y, ("batch", "length", "mlp"))
    matmul = lambda x, w: dense(x, w[...].astype(dt), 1, constrain)
    h_BxLxF = mlp(matmul(x_BxLxD, self.w_up))
    if self.gated:
      h_BxLxF = jax.nn.silu(mlp(matmul(x_BxLxD, self.w_gate))) * h_BxLxF
    else:
      h_BxLxF = jax.nn.gelu(h_BxLxF)
    return constrain(matmul(h_BxLxF, self.w_down), ("batch", "length", None))
