"""The inner loop: InnerOpt (AdamW) and one worker's training step.

Every worker m runs `θ_m ← InnerOpt(θ_m, ∇ loss(θ_m, batch_m(t)))` independently; the inner
optimizer state is never communicated (SPEC §1). The step is written for ONE worker; the
algorithm lifts its two halves over the worker axis (`algorithm.over_workers` for the gradient,
`jax.vmap` for `apply_update`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diloco_jax import checks

PyTree = Any
LossFn = Callable[[PyTree, jax.Array], tuple[jax.Array, dict]]


def inner_optimizer(
    learning_rate: float,
    num_steps: int,
    warmup_steps: int = 1000,
    final_lr_fraction: float = 0.05,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float | None = None,
    grad_clip: float | None = 1.0,
) -> optax.GradientTransformation:
  """AdamW as in the scaling-laws paper: linear warm-up, cosine decay to 5 % of peak, weight
  decay 1/T by default (optax scales it by the learning rate, like PyTorch's AdamW), global-norm
  clipping of the inner gradients."""
  num_steps = checks.integer("num_steps", num_steps, 1)
  warmup_steps = checks.integer("warmup_steps", warmup_steps, 0)
  warmup_steps = min(warmup_steps, max(num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=max(num_steps, warmup_steps + 1),
      end_value=learning_rate * final_lr_fraction,
  )
  wd = 1.0 / num_steps if weight_decay is None else weight_decay
  adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=wd)
  if grad_clip is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(grad_clip), adamw)


def worker_step(loss_fn: LossFn, opt: optax.GradientTransformation, params: PyTree,
                opt_state: PyTree, batch: jax.Array):
  """One inner step of one worker. Returns (params, opt_state, loss, aux): aux is the loss
  function's own dict (its loss terms and statistics, e.g. the MoE's router metrics), carried
  out to the metrics."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
  params, opt_state = apply_update(opt, grads, opt_state, params)
  return params, opt_state, loss, aux


def apply_update(opt: optax.GradientTransformation, grads: PyTree, opt_state: PyTree,
                 params: PyTree):
  """The optimizer's half of `worker_step`: (params, opt_state) after one update by `grads`."""
  updates, opt_state = opt.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
