"""The outer loop: OuterOpt on the outer gradient Δ, and the α-merge of Streaming DiLoCo.

Δ = mean_m(θ_g − θ_m) ("old minus new") is treated as a gradient: the outer optimizer subtracts
it. Any optax transform works; the default is Nesterov SGD, which matches PyTorch's
`SGD(nesterov=True)`: v ← μ·v + Δ; θ_g ← θ_g − η·(Δ + μ·v) (SPEC §1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any

OUTER_OPTIMIZERS = ("nesterov", "sgd", "adam")
OUTER_LR_SCHEDULES = ("constant", "cosine")


def outer_optimizer(name: str = "nesterov", learning_rate: float = 0.7,
                    momentum: float = 0.9, schedule: str = "constant", num_outer_steps: int = 1,
                    final_fraction: float = 0.05) -> optax.GradientTransformation:
  """DiLoCo used η=0.7, μ=0.9; Streaming DiLoCo η=0.4. `sgd` with momentum 0 and lr 1 is FedAvg.

  `schedule`: "constant" η (the papers'), or "cosine": η decayed to `final_fraction`·η over
  `num_outer_steps` outer steps, then held there (the inner schedule's shape, on the outer
  step count; each fragment's optimizer state counts its own steps)."""
  if schedule not in OUTER_LR_SCHEDULES:
    raise ValueError(f"diloco.outer_lr_schedule must be one of {OUTER_LR_SCHEDULES}, got "
                     f"{schedule!r}")
  if schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(learning_rate, max(int(num_outer_steps), 1),
                                                alpha=final_fraction)
  if name == "nesterov":
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=bool(momentum))
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum or None)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"diloco.outer_optimizer must be one of {OUTER_OPTIMIZERS}, got {name!r}")


def outer_gradient(outer_leaves: list, local_leaves: list) -> list:
  """Per-worker Δ_m = θ_g − θ_m in fp32; local leaves carry a leading [M] dimension."""
  return [(g[None].astype(jnp.float32) - w.astype(jnp.float32)) for g, w in zip(outer_leaves, local_leaves)]


def outer_update(opt: optax.GradientTransformation, outer_leaves: list, opt_state: PyTree,
                 delta_leaves: list):
  """θ_g ← OuterOpt(θ_g, Δ). Returns (new outer leaves, new outer optimizer state)."""
  updates, opt_state = opt.update(delta_leaves, opt_state, outer_leaves)
  return optax.apply_updates(outer_leaves, updates), opt_state


def merge(local_leaves: list, outer_leaves: list, alpha: float) -> list:
  """θ_m ← α·θ_m + (1 − α)·θ_g for every worker. α = 0 is DiLoCo's restart from the outer copy,
  done as an exact broadcast so that it is bit-identical (no 0·θ_m term that could carry a NaN)."""
  out = []
  for w, g in zip(local_leaves, outer_leaves):
    g = jnp.broadcast_to(g[None].astype(w.dtype), w.shape)
    out.append(g if alpha == 0.0 else w if alpha == 1.0 else alpha * w + (1.0 - alpha) * g)
  return out


def merge_own(local_leaves: list, outer_leaves: list, alpha: float) -> list:
  """`merge` when every worker has its own outer copy (eager updates: leaves [M, ...])."""
  return [g.astype(w.dtype) if alpha == 0.0 else w if alpha == 1.0
          else alpha * w + (1.0 - alpha) * g.astype(w.dtype)
          for w, g in zip(local_leaves, outer_leaves)]


def eager_proxy(delta_M: list, mean_prev: list, sent_prev_M: list) -> list:
  """Eager updates (SPEC §5): worker m's outer gradient while the round's all-reduce is still
  on the wire, Δ̂_m(r) = Δ_m(r)/M + (Δ̄(r−1) − Q(Δ_m(r−1))/M): its own fresh Δ (unquantized:
  nothing is sent to itself) plus the others' one-round-stale ones, Σ_{k≠m} Q(Δ_k(r−1))/M,
  which is the mean that has just arrived minus what m itself sent into it. The others' part
  is formed first, so for M = 1 it is exactly 0 and Δ̂ = Δ (DiLoCo without delay).
  Leaves: Δ_m and Q(Δ_m(r−1)) [M, ...], Δ̄(r−1) without the worker dim; zeros at round 1."""
  M = delta_M[0].shape[0]
  return [d / M + (mean[None] - sent / M) for d, mean, sent in zip(delta_M, mean_prev, sent_prev_M)]


def pairwise_cosine(mean: list, sq_norms_M: jax.Array, count: jax.Array | None = None) -> jax.Array:
  """The workers' outer gradients' pairwise cosine similarity (the paper tracks it), from what
  every worker already has after the all-reduce: the mean Δ̄ and the M squared norms ‖Δ_m‖².

  Σ_{m≠k} ⟨Δ_m, Δ_k⟩ = ‖M·Δ̄‖² − Σ_m ‖Δ_m‖², divided by Σ_{m≠k} ‖Δ_m‖‖Δ_k‖: the norm-weighted
  mean of the pairwise cosines. Exactly cos(Δ_1, Δ_2) for M = 2, and the plain mean of the
  pairwise cosines when the norms are equal. No worker's full Δ has to travel for it. With
  `count` workers in the mean (the others sent zeros), M·Δ̄ becomes count·Δ̄.
  """
  M = sq_norms_M.shape[0] if count is None else count.astype(jnp.float32)
  sum_sq = (M * M) * sum(jnp.sum(jnp.square(m)) for m in mean)
  norms = jnp.sqrt(sq_norms_M)
  cross = jnp.square(jnp.sum(norms)) - jnp.sum(sq_norms_M)
  return (sum_sq - jnp.sum(sq_norms_M)) / jnp.maximum(cross, 1e-30)
