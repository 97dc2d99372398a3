"""The language-model loss: next-token cross-entropy plus z-loss on the logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diloco_jax.model.config import ModelConfig
from diloco_jax.model.layers import _no_constraint
from diloco_jax.model.transformer import apply


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
