"""Held-out loss and per-position loss of any parameters.

The loss at position i is the cross-entropy of predicting token i+1 from tokens 0..i (nats),
averaged over every held-out sequence; it is what long-context evaluations plot against i. The
held-out loss is its mean over positions (every position holds the same number of sequences), the
same number as the trainer's `eval_loss` (cross-entropy only, no z-loss).

Model-agnostic: everything takes `apply_fn(params, tokens_BxL) -> logits_BxLxV`; `model_apply(cfg)`
gives the one for `diloco_jax.model`. `apply_fn` is a static jit argument, so pass the same object
each time (`model_apply` is cached per config) to reuse the compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diloco_jax import data
from diloco_jax import model as model_lib

ApplyFn = Callable[[object, jax.Array], jax.Array]


@functools.lru_cache(maxsize=32)
def model_apply(cfg: model_lib.ModelConfig) -> ApplyFn:
  """`model.apply` bound to `cfg` in eval mode, logits only; one object per config (so jit's
  cache hits)."""
  return lambda params, tokens_BxL: model_lib.apply(cfg, params, tokens_BxL, train=False)[0]


def token_losses(apply_fn: ApplyFn, params, batch_BxS: jax.Array) -> jax.Array:
  """Cross-entropy [B, L] float32 of each target token in `batch_BxS` (S = L + 1 tokens)."""
  logits_BxLxV = apply_fn(params, batch_BxS[:, :-1]).astype(jnp.float32)
  targets_BxL = batch_BxS[:, 1:]
  lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return lse_BxL - target_BxL


@functools.partial(jax.jit, static_argnums=0)
def heldout_losses(apply_fn: ApplyFn, params, batches_NxBxS: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """(mean loss [], mean loss per position [L]) over N batches of B sequences of L + 1 tokens.

  The batches go through `lax.map` one at a time, so memory is that of one [B, L, V] logits
  array however many batches there are.
  """
  sums_NxL = jax.lax.map(lambda b: jnp.sum(token_losses(apply_fn, params, b), axis=0),
                         batches_NxBxS)
  n, b = batches_NxBxS.shape[:2]
  per_position_L = jnp.sum(sums_NxL, axis=0) / (n * b)
  return jnp.mean(per_position_L), per_position_L


def heldout_set(source, *, seq_len: int, batch_size: int, num_batches: int,
                seed: int) -> np.ndarray:
  """The held-out batches int32 [N, B, L + 1] the trainer evaluates on for these arguments.

  `source` is the run's `data.SyntheticLanguage` or `data.TextBytes` (any split: the held-out
  split is taken). The trainer draws its held-out set from the same stream (one worker), so the
  loss here at the same step equals its `eval_loss`.
  """
  batches = data.eval_batches(source, num_workers=1, batch_size=batch_size, seq_len=seq_len,
                              seed=seed, num_batches=num_batches)
  return np.stack([b[0] for b in batches])


def position_buckets(per_position_L) -> list[tuple[int, int, float]]:
  """(first, last, mean loss) over log-spaced position ranges 0, 1-2, 3-6, 7-14, ...: a short
  summary of the per-position curve (long contexts have few positions at the start)."""
  per_position_L = np.asarray(per_position_L, np.float64)
  out, lo = [], 0
  while lo < len(per_position_L):
    hi = min(2 * lo + 1, len(per_position_L))   # [lo, hi): 1, 2, 4, 8, ... positions
    out.append((lo, hi - 1, float(per_position_L[lo:hi].mean())))
    lo = hi
  return out
