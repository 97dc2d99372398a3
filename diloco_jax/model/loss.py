"""The training loss: next-token cross-entropy, z-loss on the logits, and the MoE's auxiliary
losses; the aux dict reports each term and the router statistics (`moe_metrics`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diloco_jax.model.config import ModelConfig
from diloco_jax.model.layers import _no_constraint
from diloco_jax.model.transformer import apply


def loss_fn(cfg: ModelConfig, params: dict, batch: jax.Array, constrain=_no_constraint, *,
            train: bool = True) -> tuple[jax.Array, dict]:
  """Loss on batch [B, L+1]: mean cross-entropy + z_loss · mean(logsumexp²), and with MoE
  blocks + load_balance_weight · Σ_blocks balance loss + router_z_weight · Σ_blocks router
  z-loss (summed over the MoE blocks as Switch/ST-MoE do; the logged values are per block and
  their mean). Returns (loss, aux): "ce" and "z_loss" always, `moe_metrics` with MoE."""
  inputs_BxL, targets_BxL = batch[:, :-1], batch[:, 1:]
  logits_BxLxV, model_aux = apply(cfg, params, inputs_BxL, constrain, train=train)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  ce = jnp.mean(lse_BxL - target_logit_BxL)
  # z-loss pulls log Z towards 0, which keeps the logits from drifting (stability at scale).
  z = cfg.z_loss * jnp.mean(lse_BxL**2)
  aux = {"ce": ce, "z_loss": z}
  loss = ce + z
  if "moe" in model_aux:
    m = model_aux["moe"]
    loss = loss + (cfg.moe.load_balance_weight * jnp.sum(m["load_balance_loss"])
                   + cfg.moe.router_z_weight * jnp.sum(m["router_z_loss"]))
    aux.update(moe_metrics(cfg, m))
  return loss, aux


def moe_metrics(cfg: ModelConfig, m: dict) -> dict:
  """The router statistics a researcher reads, per MoE block ("moe/b{i}/…", i the block index)
  and averaged over the MoE blocks ("moe/…"): load (the fraction of routed assignments per
  expert, [E]: the load histogram), load_entropy (ln E when balanced), max_load (max/mean),
  dead_experts (load below 1/(10E)), dropped_fraction, router_confidence (mean top
  probability), load_balance_loss, router_z_loss."""
  E = cfg.moe.num_experts
  load_NxE = m["expert_load"]
  per_block = {
      "load_entropy": -jnp.sum(jnp.where(load_NxE > 0, load_NxE * jnp.log(load_NxE), 0.0), -1),
      "max_load": E * jnp.max(load_NxE, axis=-1),
      "dead_experts": jnp.sum(load_NxE < 1.0 / (10 * E), axis=-1).astype(jnp.float32),
      **{k: m[k] for k in ("dropped_fraction", "router_confidence", "load_balance_loss",
                           "router_z_loss")}}
  out = {f"moe/{k}": jnp.mean(v) for k, v in per_block.items()}
  for n, i in enumerate(cfg.moe_blocks):
    out[f"moe/b{i}/load"] = load_NxE[n]
    out.update({f"moe/b{i}/{k}": v[n] for k, v in per_block.items()})
  return out
