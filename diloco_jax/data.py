"""Input pipelines: per-worker token batches for DiLoCo training, built on grain.

Two sources, both random access (``__len__`` / ``__getitem__``) so grain can shuffle, shard,
checkpoint and resume them without reading anything twice:

* ``SyntheticLanguage``: the embedded default. No file; a deterministic, language-like Markov
  source whose entropy rate (the best achievable per-token loss) is known in closed form, so a run
  can report how far its loss is from the floor.
* ``TextBytes``: UTF-8 text files read as bytes (vocab 256), cut into fixed-length chunks, with a
  deterministic held-out tail of every file for evaluation.

``make_batches`` turns either into a ``WorkerBatches`` iterator of ``int32[M, B, L+1]`` arrays:
``M`` DiLoCo workers, ``B`` sequences per worker, ``L+1`` tokens per sequence (inputs are
``x[..., :-1]``, targets ``x[..., 1:]``). Worker ``m`` reads the disjoint shard of global stream
positions ``m, m+M, m+2M, ...``. The iterator's state is a small JSON-serialisable dict, so a
checkpoint can store it and a resumed run continues bit-for-bit.

Evaluation reuses the same pipeline: ``make_batches(..., split="eval")`` streams held-out data
(disjoint from ``"train"``), and ``eval_batches`` materialises its first ``num_batches`` batches:
a fixed held-out set for a given seed.

Numpy only; no JAX, absl or ml_collections here (the trainer converts its config to these
typed arguments).
"""

from __future__ import annotations

import bisect
import codecs
import functools
import glob
import math
import os
from collections.abc import Sequence

import grain
import numpy as np

SPLITS = ("train", "eval")
_SPLIT_ID = {"train": 0, "eval": 1}
# The synthetic dataset is "infinite": 2**40 sequences is far beyond any run.
_SYNTHETIC_LENGTH = 2**40
_STATE_FORMAT = "diloco_jax.data/1"


def _check_int(name: str, value, minimum: int) -> int:
  """Returns `value` as an int, or raises one clear sentence naming the argument."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _check_split(split) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  return split


# ----------------------------------------------------------------------------------------------
# Synthetic source.
# ----------------------------------------------------------------------------------------------


class SyntheticLanguage:
  r"""A class-based bigram language: a Markov chain over tokens with a closed-form entropy rate.

  Every token ``x`` belongs to exactly one word class ``c(x)`` (think part of speech). Classes
  follow a Markov chain with transition matrix ``T[c, c']`` (rows drawn from a Dirichlet with a
  small concentration, so each class has a few likely successors: "syntax"), mixed with a little
  uniform mass so every entry is positive and the chain is ergodic and aperiodic. Each class emits
  its own tokens with a Zipf-like distribution ``E_c`` (a few frequent words, a long tail). Class
  sizes vary.

  Because the class is a function of the token, the token process is itself a Markov chain with
  ``P(x' | x) = T[c(x), c(x')] * E_{c(x')}(x')``. Sequences start from the stationary distribution
  ``p(x) = pi[c(x)] * E_{c(x)}(x)``, where ``pi`` is the stationary distribution of ``T``. The
  conditional entropy of every token given its whole past is then the entropy rate

  .. math::

     h = \sum_c \pi_c \Big[ H(T_{c,:}) + \sum_{c'} T_{c,c'} \, H(E_{c'}) \Big]
     \quad \text{nats/token},

  (class-transition entropy plus expected emission entropy), which is the lowest per-token
  cross-entropy any model can reach on this data: the "entropy floor".

  Everything is a deterministic function of ``(vocab_size, num_classes, seed)``.

  Attributes:
    vocab_size: number of distinct tokens ``V``; samples lie in ``[0, V)``.
    num_classes: number of word classes ``K``.
    seed: the construction seed.
    token_class: ``int64[V]``, the class of each token.
    class_transitions: ``float64[K, K]``, ``T`` (rows sum to 1, all entries > 0).
    class_stationary: ``float64[K]``, ``pi`` with ``pi @ T == pi``.
    emission: ``float64[V]``, ``E_{c(x)}(x)``: the probability that class ``c(x)`` emits ``x``.
  """

  # Dirichlet concentration of the rows of T: small -> sparse, syntax-like successor sets.
  _ROW_CONCENTRATION = 0.2
  # Uniform mass mixed into T so that every transition is possible (ergodic, aperiodic).
  _SMOOTHING = 0.02
  # Zipf exponent of the within-class emission distributions.
  _ZIPF_EXPONENT = 1.1

  def __init__(self, vocab_size: int = 256, num_classes: int = 16, seed: int = 0):
    self.vocab_size = _check_int("vocab_size", vocab_size, 1)
    self.num_classes = _check_int("num_classes", num_classes, 1)
    self.seed = _check_int("seed", seed, 0)
    if self.num_classes > self.vocab_size:
      raise ValueError(
        f"num_classes must be <= vocab_size so every class owns a token, got "
        f"num_classes={num_classes} and vocab_size={vocab_size}."
      )
    v, k = self.vocab_size, self.num_classes
    rng = np.random.default_rng([self.seed, 0x5EED])

    # Class sizes: every class owns >= 1 token; the rest are spread unevenly.
    size_weights = rng.dirichlet(np.full(k, 2.0))
    sizes = 1 + rng.multinomial(v - k, size_weights)
    # Token ids are a random permutation, so a class is not a contiguous id range.
    members = rng.permutation(v)
    ends = np.cumsum(sizes)
    self._members = [members[e - s : e] for s, e in zip(sizes, ends)]
    self.token_class = np.empty(v, dtype=np.int64)
    self.emission = np.empty(v, dtype=np.float64)
    for c, toks in enumerate(self._members):
      zipf = (np.arange(1, len(toks) + 1, dtype=np.float64)) ** -self._ZIPF_EXPONENT
      self.token_class[toks] = c
      self.emission[toks] = zipf / zipf.sum()

    rows = rng.dirichlet(np.full(k, self._ROW_CONCENTRATION), size=k)
    t = (1.0 - self._SMOOTHING) * rows + self._SMOOTHING / k
    self.class_transitions = t / t.sum(axis=1, keepdims=True)
    self.class_stationary = _stationary_distribution(self.class_transitions)

    # Sampling tables (inverse-CDF). Cumulative rows end at exactly 1.
    self._pi_cum_list = _cumulative(self.class_stationary).tolist()
    self._t_cum_rows = [_cumulative(row).tolist() for row in self.class_transitions]
    # Emission CDFs of all classes in one sorted array: class c's entries are c + cdf_c, so one
    # searchsorted on (class + u) samples every position's token at once.
    self._emit_tokens = np.concatenate(self._members)
    self._emit_keys = np.concatenate(
      [c + _cumulative(self.emission[toks]) for c, toks in enumerate(self._members)]
    )
    self._class_last = ends - 1  # last index of each class in _emit_tokens

  def __repr__(self) -> str:
    return (
      f"SyntheticLanguage(vocab_size={self.vocab_size}, num_classes={self.num_classes}, "
      f"seed={self.seed})"
    )

  def entropy_rate(self) -> float:
    """Exact entropy rate ``h`` in nats/token (see the class docstring for the formula)."""
    t, pi = self.class_transitions, self.class_stationary
    h_rows = -np.sum(t * np.log(t), axis=1)  # H(T[c, :]); all entries > 0
    h_emit = np.zeros(self.num_classes)
    for c, toks in enumerate(self._members):
      e = self.emission[toks]
      h_emit[c] = -np.sum(e * np.log(e))
    return float(pi @ (h_rows + t @ h_emit))

  def transition_matrix(self) -> np.ndarray:
    """``float64[V, V]``: ``P[x, x'] = T[c(x), c(x')] * E(x')``, the token transition matrix."""
    c = self.token_class
    return self.class_transitions[c[:, None], c[None, :]] * self.emission[None, :]

  def stationary_distribution(self) -> np.ndarray:
    """``float64[V]``: ``p(x) = pi[c(x)] * E(x)``, the stationary token distribution."""
    return self.class_stationary[self.token_class] * self.emission

  def transition_logprob(self, prev, nxt) -> np.ndarray:
    """``log P(nxt | prev)`` elementwise (natural log) for token arrays of the same shape."""
    prev, nxt = np.asarray(prev), np.asarray(nxt)
    c_prev, c_next = self.token_class[prev], self.token_class[nxt]
    return np.log(self.class_transitions[c_prev, c_next]) + np.log(self.emission[nxt])

  def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
    """Samples ``int32[length]`` tokens, the chain started from its stationary distribution.

    One uniform per position picks the class by inverse CDF (``u < 1`` and every CDF ends at
    exactly 1, so the pick is always a valid class); a second uniform per position picks the
    token within its class, for all positions at once. The class walk is a plain loop over
    Python floats with ``bisect``, which measured faster than vectorised prefix composition for
    ``K = 16`` (about 0.2 ms per 1,000 tokens).
    """
    length = _check_int("length", length, 0)
    u_class = rng.random(length)
    u_token = rng.random(length)
    path = []
    if length:
      bisect_right, t_cum = bisect.bisect_right, self._t_cum_rows
      u = u_class.tolist()
      c = bisect_right(self._pi_cum_list, u[0])
      path.append(c)
      for x in u[1:]:
        c = bisect_right(t_cum[c], x)
        path.append(c)
    classes = np.array(path, dtype=np.int64)
    pos = np.searchsorted(self._emit_keys, classes + u_token, side="right")
    pos = np.minimum(pos, self._class_last[classes])  # guard c + u rounding up to c + 1
    return self._emit_tokens[pos].astype(np.int32)


def _cumulative(p: np.ndarray) -> np.ndarray:
  cdf = np.cumsum(p)
  cdf[-1] = 1.0
  return cdf


def _stationary_distribution(t: np.ndarray) -> np.ndarray:
  """Stationary distribution of an ergodic row-stochastic matrix, to float64 precision."""
  k = t.shape[0]
  # Solve pi (T - I) = 0 with sum(pi) = 1 (replace one redundant equation by the normalisation).
  a = t.T - np.eye(k)
  a[-1, :] = 1.0
  b = np.zeros(k)
  b[-1] = 1.0
  pi = np.linalg.solve(a, b)
  for _ in range(3):  # polish with power iterations
    pi = pi @ t
    pi = pi / pi.sum()
  return pi


# ----------------------------------------------------------------------------------------------
# Text source.
# ----------------------------------------------------------------------------------------------


_UTF8_CHUNK = 1 << 24


@functools.lru_cache(maxsize=None)
def _utf8_error(path: str, size: int, mtime_ns: int) -> str | None:
  """The first decoding error of the file as a sentence, or None if it is valid UTF-8 (cached
  per file version: the train and eval splits, and every later source, reuse the answer)."""
  del size, mtime_ns   # the cache key
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset = 0
  with open(path, "rb") as f:
    while True:
      chunk = f.read(_UTF8_CHUNK)
      try:
        decoder.decode(chunk, final=not chunk)
      except UnicodeDecodeError as e:
        # e.start counts from the decoder's buffered tail (at most 3 bytes of a split character)
        # plus this chunk.
        pending = len(e.object) - len(chunk)
        bad = offset - pending + e.start
        return (f"text file {path!r} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                f"offset {bad} ({e.reason}); set data.check_utf8=False to read its raw bytes "
                f"anyway.")
      if not chunk:
        return None
      offset += len(chunk)


def check_utf8_file(path: str) -> None:
  """Raises ValueError (one sentence naming the file and its first bad byte's offset) unless
  the file is valid UTF-8."""
  st = os.stat(path)
  error = _utf8_error(os.path.abspath(path), st.st_size, st.st_mtime_ns)
  if error:
    raise ValueError(error)


def _resolve_paths(paths: Sequence[str] | str) -> list[str]:
  """Files named by `paths`: file paths, glob patterns, or directories (all ``*.txt`` in them)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  if not paths:
    raise FileNotFoundError("no text file paths were given.")
  files = []
  for p in map(os.fspath, paths):
    if os.path.isdir(p):
      found = sorted(glob.glob(os.path.join(glob.escape(p), "*.txt")))
      if not found:
        raise FileNotFoundError(f"text data directory {p!r} contains no *.txt files.")
    elif any(ch in p for ch in "*?["):
      found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
      if not found:
        raise FileNotFoundError(f"text data pattern {p!r} matches no files.")
    elif os.path.isfile(p):
      found = [p]
    else:
      raise FileNotFoundError(f"text data file {p!r} does not exist.")
    files.extend(f for f in found if f not in files)
  return files


class TextBytes:
  """UTF-8 text files as byte-level tokens (vocab 256), cut into fixed-length chunks.

  Held-out split: of every file of ``n`` bytes, the last ``floor(n * heldout_fraction)`` bytes are
  ``"eval"`` and the rest ``"train"``; the two never share a byte. Each split's region of each file
  is cut into non-overlapping chunks of ``seq_len + 1`` bytes starting at the region's start (a
  partial chunk at the end is dropped), so distinct chunks share no byte either. Files are
  memory-mapped, so start-up cost does not grow with corpus size.

  Element ``i`` (``0 <= i < len(self)``) is chunk ``i`` as ``int32[seq_len + 1]``; chunks are
  ordered file by file (the pipeline shuffles them).

  Args:
    paths: file paths, glob patterns, or directories (meaning every ``*.txt`` in them), or one such
      string. A missing file, a pattern matching nothing or an empty directory raises
      ``FileNotFoundError`` naming it.
    seq_len: ``L``, tokens per training sequence (each chunk holds ``L + 1`` bytes).
    split: ``"train"`` or ``"eval"``.
    heldout_fraction: fraction of each file's bytes (its tail) reserved for ``"eval"``, in
      ``[0, 1)``.
    check_utf8: reject a file that is not valid UTF-8 (e.g. a binary file named by mistake),
      naming it and the offset of its first bad byte. Each file is checked once per process
      (about 1 s per GB); False reads any file's bytes as they are.
  """

  vocab_size = 256

  def __init__(
    self,
    paths: list[str] | str,
    seq_len: int,
    split: str = "train",
    heldout_fraction: float = 0.01,
    check_utf8: bool = True,
  ):
    seq_len = _check_int("seq_len", seq_len, 1)
    split = _check_split(split)
    if not isinstance(heldout_fraction, (int, float)) or not 0.0 <= heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}.")
    files = []
    for path in _resolve_paths(paths):
      size = os.path.getsize(path)
      if size < seq_len + 1:
        raise ValueError(
          f"text file {path!r} has {size} bytes, fewer than one sequence of "
          f"seq_len + 1 = {seq_len + 1} bytes."
        )
      if check_utf8:
        check_utf8_file(path)
      files.append((path, np.memmap(path, dtype=np.uint8, mode="r")))
    self._init(files, seq_len, split, float(heldout_fraction))

  def _init(self, files, seq_len: int, split: str, heldout_fraction: float) -> None:
    self._files = files
    self.paths = [p for p, _ in files]
    self.seq_len = seq_len
    self.split = split
    self.heldout_fraction = heldout_fraction
    chunk = seq_len + 1
    file_index, starts, regions = [], [], []
    for f, (_, data) in enumerate(files):
      n = len(data)
      boundary = n - math.floor(n * heldout_fraction)
      lo, hi = (0, boundary) if split == "train" else (boundary, n)
      regions.append((lo, hi))
      count = (hi - lo) // chunk
      starts.append(lo + chunk * np.arange(count, dtype=np.int64))
      file_index.append(np.full(count, f, dtype=np.int64))
    self._regions = regions
    self._starts = np.concatenate(starts)
    self._file_index = np.concatenate(file_index)
    if len(self._starts) == 0:
      raise ValueError(
        f"split {split!r} holds no complete sequence of seq_len + 1 = {chunk} bytes in any file "
        f"(heldout_fraction={heldout_fraction}); lower data.seq_len or add text."
      )

  def respec(self, *, seq_len: int | None = None, split: str | None = None) -> TextBytes:
    """The same files (and held-out fraction) with another sequence length and/or split."""
    other = object.__new__(TextBytes)
    other._init(
      self._files,
      self.seq_len if seq_len is None else _check_int("seq_len", seq_len, 1),
      self.split if split is None else _check_split(split),
      self.heldout_fraction,
    )
    return other

  def __repr__(self) -> str:
    return (
      f"TextBytes({len(self.paths)} files, seq_len={self.seq_len}, split={self.split!r}, "
      f"heldout_fraction={self.heldout_fraction}, chunks={len(self)})"
    )

  def __len__(self) -> int:
    return len(self._starts)

  def region(self, file: int) -> np.ndarray:
    """This split's bytes of file `file` (index into ``paths``): one long contiguous document,
    uint8 (memory-mapped, not copied). The held-out regions are the needle haystacks and the
    long documents of the long-context loss."""
    lo, hi = self._regions[file]
    return self._files[file][1][lo:hi]

  def chunk_span(self, index: int) -> tuple[str, int, int]:
    """``(path, start, stop)``: the byte range ``[start, stop)`` of chunk ``index``."""
    start = int(self._starts[index])
    return self.paths[self._file_index[index]], start, start + self.seq_len + 1

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"chunk index {index} is out of range for {len(self)} chunks.")
    start = self._starts[index]
    data = self._files[self._file_index[index]][1]
    return np.asarray(data[start : start + self.seq_len + 1], dtype=np.int32)


def entropy_floor(source) -> float | None:
  """Best achievable per-token loss (nats): ``h`` for ``SyntheticLanguage``, ``None`` for text
  (and sources built on it)."""
  if isinstance(source, SyntheticLanguage):
    return source.entropy_rate()
  if isinstance(source, TextBytes) or hasattr(source, "elements"):
    return None
  raise TypeError(f"source must be a SyntheticLanguage or TextBytes, got {type(source).__name__}.")


def bytes_per_token(source) -> float | None:
  """UTF-8 bytes one token of `source` stands for (1 for byte-level text and the retrieval mix
  built on it), so a loss of ℓ nats per token is ℓ / (ln 2 · bytes_per_token) bits per byte, which
  compares runs across tokenizers; None for the synthetic language (it has no bytes)."""
  if isinstance(source, SyntheticLanguage):
    return None
  if hasattr(source, "bytes_per_token"):   # tokenizer.TokenShards: its split's bytes / tokens
    return float(source.bytes_per_token)
  if isinstance(source, TextBytes) or hasattr(source, "elements"):
    return 1.0
  raise TypeError(f"source must be a SyntheticLanguage or TextBytes, got {type(source).__name__}.")


# ----------------------------------------------------------------------------------------------
# Pipelines.
# ----------------------------------------------------------------------------------------------


class _SyntheticSequences:
  """Random-access stream: element ``i`` is ``sample(default_rng([seed, split_id, i]), n)``."""

  def __init__(self, language: SyntheticLanguage, length: int, seed: int, split_id: int):
    self._language, self._length, self._seed, self._split_id = language, length, seed, split_id

  def __len__(self) -> int:
    return _SYNTHETIC_LENGTH

  def __getitem__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, self._split_id, int(index)])
    return self._language.sample(rng, self._length)


def _select_workers(
  elements, num_workers: int, batch_size: int, workers: tuple[int, ...], step: int
) -> np.ndarray:
  """Step ``step``'s rows for `workers` as ``[len(workers), B, L+1]``: stream position
  ``step*M*B + b*M + m`` is worker ``m``'s row ``b``. Only those positions are read, so a
  process that feeds some of the workers never touches the others' shards."""
  base = step * num_workers * batch_size
  return _stack([
    _stack([elements[base + b * num_workers + m] for b in range(batch_size)]) for m in workers
  ])


def _stack(rows: list):
  """np.stack of arrays, or key by key of dicts of arrays (packed windows, `packing`)."""
  if isinstance(rows[0], dict):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return np.stack(rows)


class WorkerBatches:
  """Iterator over ``int32[M, B, L+1]`` batches, one disjoint shard per worker; checkpointable.

  Built by ``make_batches``. Step ``k`` holds global stream positions ``k*M*B + j`` for
  ``j < M*B``; position ``j`` goes to worker ``j % M``, row ``j // M``. So worker ``m`` reads
  positions ``m, m+M, m+2M, ...``: disjoint shards. ``get_state`` / ``set_state`` save and
  restore the position (a JSON-serialisable dict), so a restored iterator yields exactly what
  the original would have yielded from that point.
  """

  def __init__(self, dataset: grain.MapDataset, pipeline: str, read_options: grain.ReadOptions):
    self._pipeline = pipeline
    self._iterator = dataset.to_iter_dataset(read_options).__iter__()

  @property
  def pipeline(self) -> str:
    """A description of everything the stream depends on (checked by ``set_state``)."""
    return self._pipeline

  def __iter__(self) -> WorkerBatches:
    return self

  def __next__(self) -> np.ndarray:
    return next(self._iterator)

  def get_state(self) -> dict:
    """``{"format", "pipeline", "next_index"}``: strings and an int, JSON-serialisable."""
    return {
      "format": _STATE_FORMAT,
      "pipeline": self._pipeline,
      "next_index": int(self._iterator.get_state()["next_index"]),
    }

  def set_state(self, state: dict) -> None:
    """Resumes from a ``get_state`` dict of an iterator built with the same arguments."""
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
      raise ValueError(f"data iterator state must be a dict with format {_STATE_FORMAT!r}.")
    if state.get("pipeline") != self._pipeline:
      raise ValueError(
        f"data iterator state was saved for pipeline {state.get('pipeline')!r} but this "
        f"iterator is {self._pipeline!r}."
      )
    self._iterator.set_state({"next_index": _check_int("next_index", state["next_index"], 0)})

  def close(self) -> None:
    """Stops grain's prefetch threads."""
    self._iterator.close()


def state_for_fewer_workers(state: dict, saved_workers: int, it: WorkerBatches) -> dict:
  """The state of `it` (a stream with fewer workers M) that continues a stream saved by
  `saved_workers` workers at `state`: the same data and arguments but M. It starts at the first
  step whose positions all lie after those the saved run read (step k reads positions
  ``k*M*B ...``), so nothing is read twice and less than one step of data is skipped."""
  head, _, shape = it.pipeline.rpartition("|")
  m = int(shape.split(",")[0].removeprefix("M="))
  saved = f"{head}|M={saved_workers}," + shape.split(",", 1)[1]
  if not isinstance(state, dict) or state.get("pipeline") != saved or saved_workers < m:
    raise ValueError(
      f"data iterator state {state!r} is not one of {saved_workers} >= {m} workers of "
      f"the stream {it.pipeline!r}."
    )
  next_index = _check_int("next_index", state["next_index"], 0)
  return {**state, "pipeline": it.pipeline, "next_index": -(-next_index * saved_workers // m)}


def make_batches(
  source: SyntheticLanguage | TextBytes,
  *,
  num_workers: int,
  batch_size: int,
  seq_len: int,
  seed: int,
  split: str = "train",
  workers: Sequence[int] | None = None,
  num_threads: int = 2,
  prefetch_batches: int = 2,
) -> WorkerBatches:
  """Per-worker batches ``int32[num_workers, batch_size, seq_len + 1]`` from `source`.

  * ``SyntheticLanguage``: stream element ``i`` is
    ``source.sample(np.random.default_rng([seed, split_id, i]), seq_len + 1)`` with
    ``split_id`` 0 for ``"train"`` and 1 for ``"eval"``: random access, deterministic, effectively
    infinite, and the two splits draw from independent random streams.
  * ``TextBytes``: its chunks, globally shuffled by grain with a seed derived from
    ``(seed, split)``, reshuffled every epoch, repeated forever. If `seq_len` or `split` differ
    from the source's, the same files are re-cut accordingly (``TextBytes.respec``). Within an
    epoch the workers' shards are disjoint; a step that needs more chunks than one epoch holds
    (tiny data) wraps into the next epoch.

  Args:
    source: the token source.
    num_workers: ``M``, DiLoCo workers (one shard each).
    batch_size: ``B``, sequences per worker per step.
    seq_len: ``L``, tokens each sequence predicts (arrays carry ``L + 1`` tokens).
    seed: non-negative integer; the same arguments always give the same stream.
    split: ``"train"`` or ``"eval"`` (held out, disjoint from train).
    workers: the workers this process feeds (ascending, contiguous not required); default all.
      Batches are then ``[len(workers), B, L+1]``, exactly those rows of the full batch, and only
      their stream positions are read. The iterator state does not depend on it, so a checkpoint
      restores onto any split of the workers over processes.
    num_threads: grain prefetch threads (0 reads synchronously in the caller's thread).
    prefetch_batches: whole ``[M, B, L+1]`` batches grain prepares ahead.

  Returns:
    A ``WorkerBatches`` iterator.
  """
  m = _check_int("num_workers", num_workers, 1)
  b = _check_int("batch_size", batch_size, 1)
  seq_len = _check_int("seq_len", seq_len, 1)
  seed = _check_int("seed", seed, 0)
  split = _check_split(split)
  read_options = grain.ReadOptions(
    num_threads=_check_int("num_threads", num_threads, 0),
    prefetch_buffer_size=_check_int("prefetch_batches", prefetch_batches, 0),
  )
  local = tuple(range(m)) if workers is None else tuple(int(w) for w in workers)
  if not local or list(local) != sorted(set(local)) or not all(0 <= w < m for w in local):
    raise ValueError(
      f"workers must be distinct ascending worker indices in [0, {m}), got {workers!r}."
    )
  shape = f"M={m},B={b},L={seq_len},seed={seed},split={split}"
  if isinstance(source, SyntheticLanguage):
    elements = _SyntheticSequences(source, seq_len + 1, seed, _SPLIT_ID[split])
    ds = grain.MapDataset.source(elements)
    pipeline = f"{source!r}|{shape}"
  elif isinstance(source, TextBytes):
    if source.seq_len != seq_len or source.split != split:
      source = source.respec(seq_len=seq_len, split=split)
    shuffle_seed = int(np.random.SeedSequence([seed, _SPLIT_ID[split]]).generate_state(1)[0])
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
    files = ",".join(os.path.basename(p) for p in source.paths)
    pipeline = (
      f"TextBytes(files=[{files}],heldout_fraction={source.heldout_fraction},"
      f"chunks={len(source)})|{shape}"
    )
  elif hasattr(source, "elements"):   # e.g. retrieval.RetrievalMix: packed dict windows
    elements, description = source.elements(seq_len + 1, seed, split)
    ds = grain.MapDataset.source(elements)
    pipeline = f"{description}|{shape}"
  else:
    raise TypeError(
      f"source must be a SyntheticLanguage, TextBytes or a source with elements(), got "
      f"{type(source).__name__}."
    )
  steps = grain.MapDataset.range(len(ds) // (m * b))
  ds = steps.map(functools.partial(_select_workers, ds, m, b, local))
  return WorkerBatches(ds, pipeline, read_options)


def eval_batches(
  source: SyntheticLanguage | TextBytes,
  *,
  num_workers: int,
  batch_size: int,
  seq_len: int,
  seed: int,
  num_batches: int,
) -> list[np.ndarray]:
  """The first `num_batches` batches of ``make_batches(..., split="eval")``: a fixed held-out set.

  The same arguments always return the same arrays, so evaluations across steps and runs are
  comparable.
  """
  num_batches = _check_int("num_batches", num_batches, 1)
  it = make_batches(
    source,
    num_workers=num_workers,
    batch_size=batch_size,
    seq_len=seq_len,
    seed=seed,
    split="eval",
    num_threads=0,
  )
  try:
    return [next(it) for _ in range(num_batches)]
  finally:
    it.close()
