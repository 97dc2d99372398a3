"""Zero-shot multiple-choice scoring: which continuation does the model find most likely?

Each choice is scored by the log-likelihood of its bytes given the context,
log p(choice | context) = Σ_i log p(c_i | context, c_<i) (nats). Two accuracies:

* ``acc_norm`` (the headline number): argmax of the log-likelihood **per byte of the choice**
  (its leading space included). Our tokenizer is UTF-8 bytes, so per byte is per token; for
  ASCII text it is also per character, the normalisation HellaSwag's usual ``acc_norm`` uses.
  Without it, longer choices lose just for having more terms to pay for.
* ``acc``: argmax of the unnormalised log-likelihood.

Ties go to the lower index. The context is truncated from the left so that context + choice
fits the model's sequence length L (L + 1 tokens: L inputs, L targets); a choice longer than L
keeps its last L bytes scored (the first ones serve as context) and is normalised by that count.

Batching: every (example, choice) pair is one row; rows are grouped by length into buckets of
power-of-two lengths (at least `min_len`, at most L), right-padded, and scored `batch_size` rows
at a time, so the scorer compiles once per bucket, not per example. Right padding is exact under
causal attention: a position never sees the pads after it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diloco_jax.evals.heldout import ApplyFn
from diloco_jax.evals.tasks import Example


@dataclasses.dataclass(frozen=True)
class Scores:
  """Per example, per choice: `logprob` log p(choice | context) in nats, and `num_bytes`, the
  number of choice bytes that log-probability sums over (the normaliser)."""

  logprob: tuple[np.ndarray, ...]
  num_bytes: tuple[np.ndarray, ...]


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes as int32 tokens (the byte-level models' vocabulary, 256)."""
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def request(context: str, choice: str, max_len: int) -> tuple[np.ndarray, int]:
  """(tokens, k): context + choice truncated from the left to at most max_len + 1 tokens; the last
  k targets tokens[-k:] are the choice's bytes that get scored."""
  ctx, cont = encode(context), encode(choice)
  if len(ctx) == 0 or len(cont) == 0:
    raise ValueError(f"context and choice must be non-empty, got {context!r} and {choice!r}.")
  tokens = np.concatenate([ctx, cont])[-(max_len + 1):]
  return tokens, min(len(cont), len(tokens) - 1)


def bucket_length(num_inputs: int, max_len: int, min_len: int = 16) -> int:
  """The padded length for a row of `num_inputs` inputs: the next power of two in
  [min_len, max_len] (max_len itself when that is smaller)."""
  return min(max_len, max(min_len, 1 << (num_inputs - 1).bit_length()))


@functools.partial(jax.jit, static_argnums=0)
def continuation_logprob(apply_fn: ApplyFn, params, inputs_BxT: jax.Array,
                         targets_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Σ_t mask[b, t] · log p(targets[b, t] | inputs[b, :t+1]) for every row b: float32 [B]."""
  logits_BxTxV = apply_fn(params, inputs_BxT).astype(jnp.float32)
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
  logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask_BxT, logp_BxT, 0.0), axis=-1)


def _pack(rows: Sequence[tuple[np.ndarray, int]], length: int, batch_size: int):
  """Right-padded (inputs, targets, mask) int32/int32/bool [batch_size, length] for ≤ batch_size
  rows; padding rows have an all-false mask."""
  inputs = np.zeros((batch_size, length), np.int32)
  targets = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), bool)
  for r, (tokens, k) in enumerate(rows):
    n = len(tokens) - 1
    inputs[r, :n], targets[r, :n] = tokens[:-1], tokens[1:]
    mask[r, n - k:n] = True
  return inputs, targets, mask


def score(apply_fn: ApplyFn, params, examples: Sequence[Example], *, max_len: int,
          batch_size: int = 16, min_len: int = 16) -> Scores:
  """Log-likelihood of every choice of every example, batched by length bucket.

  Args:
    apply_fn: ``(params, tokens_BxT) -> logits_BxTxV``, causal (a byte-level model: V >= 256).
    params: its parameters.
    examples: the questions (`tasks.Example`).
    max_len: L, the model's sequence length; longer inputs are truncated from the left.
    batch_size: rows (choices) per call.
    min_len: the shortest bucket, so short prompts do not each get their own program.
  """
  rows = []   # (example index, choice index, tokens, k)
  for e, ex in enumerate(examples):
    for c, choice in enumerate(ex.choices):
      rows.append((e, c) + request(ex.context, choice, max_len))
  by_bucket: dict[int, list] = {}
  for row in rows:
    by_bucket.setdefault(bucket_length(len(row[2]) - 1, max_len, min_len), []).append(row)
  pending = []   # dispatched batches: (rows, device result); fetched once all are dispatched
  for length, bucket in sorted(by_bucket.items()):
    for i in range(0, len(bucket), batch_size):
      chunk = bucket[i:i + batch_size]
      arrays = _pack([(tokens, k) for _, _, tokens, k in chunk], length, batch_size)
      pending.append((chunk, continuation_logprob(apply_fn, params, *arrays)))
  logprob = [np.zeros(len(ex.choices), np.float64) for ex in examples]
  num_bytes = [np.zeros(len(ex.choices), np.int64) for ex in examples]
  for chunk, result in pending:
    result = np.asarray(result)
    for r, (e, c, _, k) in enumerate(chunk):
      logprob[e][c], num_bytes[e][c] = result[r], k
  return Scores(tuple(logprob), tuple(num_bytes))


def predictions(scores: Scores, normalize: bool = True) -> np.ndarray:
  """Index of the chosen answer per example: argmax of log-likelihood (per byte if `normalize`)."""
  return np.array([int(np.argmax(lp / n if normalize else lp))
                   for lp, n in zip(scores.logprob, scores.num_bytes)])


def accuracy(examples: Sequence[Example], scores: Scores) -> dict:
  """{"acc_norm", "acc", "num_examples"}: accuracies per byte-normalised and raw likelihood."""
  labels = np.array([ex.label for ex in examples])
  return {"acc_norm": float(np.mean(predictions(scores, True) == labels)),
          "acc": float(np.mean(predictions(scores, False) == labels)),
          "num_examples": len(examples)}


def evaluate(apply_fn: ApplyFn, params, examples: Sequence[Example], *, max_len: int,
             batch_size: int = 16) -> dict:
  """`accuracy` of `score`: one task's numbers."""
  return accuracy(examples, score(apply_fn, params, examples, max_len=max_len,
                                  batch_size=batch_size))
