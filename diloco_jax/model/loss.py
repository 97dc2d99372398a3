"""The training loss: next-token cross-entropy, z-loss on the logits, and the MoE's auxiliary
losses; the aux dict reports each term and the router statistics (`moe_metrics`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diloco_jax.model.config import ModelConfig
from diloco_jax.model.layers import _no_constraint
from diloco_jax.model.transformer import apply


def loss_fn(cfg: ModelConfig, params: dict, batch, constrain=_no_constraint, *,
            train: bool = True) -> tuple[jax.Array, dict]:
  """Loss on a batch of B windows of L + 1 tokens: the weighted mean cross-entropy + z_loss ·
  mean(logsumexp²), and with MoE blocks + load_balance_weight · Σ_blocks balance loss +
  router_z_weight · Σ_blocks router z-loss (summed over the MoE blocks as Switch/ST-MoE do; the
  logged values are per block and their mean).

  `batch` is either int32 [B, L+1] tokens (every target weighs 1) or a packed dict
  (`diloco_jax.packing`): "tokens" [B, L+1] and optionally "segment_ids" and "positions"
  [B, L+1] (passed to the model for the inputs) and "loss_weights" [B, L] (one per target).
  With weights, the cross-entropy term is Σ w·ce / Σ w, while the reported "ce" stays the
  plain mean over the targets that count (w > 0), comparable with an unweighted run.

  Returns (loss, aux): "ce" and "z_loss" always, "ce_upweighted" (the mean cross-entropy of
  the targets weighted above 1, e.g. retrieval answers) with weights, `moe_metrics` with MoE."""
  packed = isinstance(batch, dict)
  tokens = batch["tokens"] if packed else batch
  inputs_BxL, targets_BxL = tokens[:, :-1], tokens[:, 1:]
  extra = {k: batch[k][:, :-1] for k in ("positions", "segment_ids") if packed and k in batch}
  logits_BxLxV, model_aux = apply(cfg, params, inputs_BxL, constrain, train=train, **extra)
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  ce_BxL = lse_BxL - target_logit_BxL
  # z-loss pulls log Z towards 0, which keeps the logits from drifting (stability at scale).
  z = cfg.z_loss * jnp.mean(lse_BxL**2)
  if packed and "loss_weights" in batch:
    w_BxL = batch["loss_weights"].astype(jnp.float32)
    counts_BxL = (w_BxL > 0).astype(jnp.float32)
    ce = jnp.sum(ce_BxL * counts_BxL) / jnp.maximum(jnp.sum(counts_BxL), 1.0)
    loss = jnp.sum(ce_BxL * w_BxL) / jnp.maximum(jnp.sum(w_BxL), 1e-9) + z
    # The up-weighted targets on their own (retrieval answers): how well the model retrieves.
    heavy_BxL = (w_BxL > 1).astype(jnp.float32)
    aux = {"ce": ce, "z_loss": z,
           "ce_upweighted": jnp.sum(ce_BxL * heavy_BxL) / jnp.maximum(jnp.sum(heavy_BxL), 1.0)}
  else:
    ce = jnp.mean(ce_BxL)
    loss = ce + z
    aux = {"ce": ce, "z_loss": z}
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
