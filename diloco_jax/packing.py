"""Document packing: variable-length documents laid end to end in one fixed-length window.

A packed window of S = L + 1 tokens is a dict of numpy arrays, the batch format the loss reads
(`model.loss_fn`) when a plain ``int32[S]`` token row is not enough:

* ``tokens``       int32   [S]   the documents' tokens, back to back; a window the documents
                                 do not fill is padded with token 0;
* ``segment_ids``  int32   [S]   1, 2, 3, … per document (0: padding): attention never crosses
                                 a segment boundary;
* ``positions``    int32   [S]   RoPE positions, restarting at 0 at every document's start;
* ``loss_weights`` float32 [L]   the weight of target t + 1 (predicted from token t): the
                                 document's own per-token weight, and 0 where the target is the
                                 first token of a new document (nothing in the window predicts
                                 it) or padding.

The last document that does not fit is cut at the window's end (its tail is dropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KEYS = ("tokens", "segment_ids", "positions", "loss_weights")


def single(tokens: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One document filling the whole window (S tokens): the packed form of a plain row."""
  return pack([tokens], len(tokens), None if weights is None else [weights])


def pack(documents: Sequence[np.ndarray], length: int,
         weights: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """The window of `length` (S) tokens holding `documents` in order (see the module docstring).

  Args:
    documents: 1-D integer token arrays, each at least one token.
    length: S, tokens in the window.
    weights: optional per-token loss weights, one array per document of its length (the weight
      of predicting that token); default 1 everywhere.
  """
  if length < 2:
    raise ValueError(f"length must be at least 2 (one input and one target), got {length!r}.")
  if weights is not None and len(weights) != len(documents):
    raise ValueError(f"weights must hold one array per document ({len(documents)}), got "
                     f"{len(weights)}.")
  tokens = np.zeros(length, np.int32)
  segments = np.zeros(length, np.int32)
  positions = np.zeros(length, np.int32)
  token_weights = np.zeros(length, np.float32)
  at = 0
  for i, doc in enumerate(documents):
    doc = np.asarray(doc)
    if doc.ndim != 1 or len(doc) == 0:
      raise ValueError(f"document {i} must be a non-empty 1-D token array, got shape "
                       f"{doc.shape}.")
    w = np.ones(len(doc), np.float32) if weights is None else np.asarray(weights[i], np.float32)
    if w.shape != doc.shape:
      raise ValueError(f"weights[{i}] has shape {w.shape}, but document {i} has {doc.shape}.")
    n = min(len(doc), length - at)
    tokens[at:at + n] = doc[:n]
    segments[at:at + n] = i + 1
    positions[at:at + n] = np.arange(n)
    token_weights[at:at + n] = w[:n]
    at += n
    if at == length:
      break
  # Target t + 1 counts only inside its own document (the first token of a document has no
  # context in this window: it is not a prediction the model can make).
  same = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
  return {"tokens": tokens, "segment_ids": segments, "positions": positions,
          "loss_weights": np.where(same, token_weights[1:], 0.0).astype(np.float32)}
