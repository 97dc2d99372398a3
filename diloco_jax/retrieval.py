"""Training data for long-context retrieval: language-modelling windows mixed with packed
needle-in-a-haystack episodes over the same text (`data.retrieval.*`).

A window of S = L + 1 bytes is, with probability `fraction`, a pack (`packing.pack`) of
retrieval episodes, each built by `evals.haystack.make_episode` from the split's text (the
haystack starts at a random sentence start): the prompt (haystack with the needle(s) at random depths, then the question) of a
log-uniform random length in [min_length, S − answer − 1], the answer bytes and a newline. The answer bytes
weigh `answer_weight` in the loss, every other byte 1 (SPEC §6.3: a small model learns to
retrieve far sooner when the answer carries extra weight). Otherwise the window is a plain
stretch of text (one segment, weights 1). Episodes of many lengths in one window teach every
distance up to the window; positions restart per episode, so an episode of length n is seen
exactly as an evaluation prompt of length n is.

Element i is a pure function of (seed, split, i): random access, deterministic, resumable
(the pipeline's iterator state is just the index), effectively infinite.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from diloco_jax import packing
from diloco_jax.evals import haystack

_LENGTH = 2**40
_SPLIT_ID = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
  """`data.retrieval.*`: the mix of retrieval episodes into a text run's training windows."""

  fraction: float = 0.0                 # of training windows that are episode packs; 0: none
  variants: tuple[str, ...] = ("single",)   # haystack.VARIANTS, drawn uniformly per episode
  num_needles: int = 4                  # needles of the multi-needle variants
  value_digits: int = 7                 # digits of each needle's number (RULER: 7)
  min_length: int = 64                  # shortest episode prompt, bytes
  answer_weight: float = 5.0            # loss weight of the answer bytes (others: 1)

  def __post_init__(self):
    if not isinstance(self.fraction, (int, float)) or not 0.0 <= self.fraction <= 1.0:
      raise ValueError(f"data.retrieval.fraction must be in [0, 1], got {self.fraction!r}")
    variants = (self.variants,) if isinstance(self.variants, str) else tuple(self.variants)
    if not variants or any(v not in haystack.VARIANTS for v in variants):
      raise ValueError(f"data.retrieval.variants must be a non-empty list of "
                       f"{haystack.VARIANTS}, got {self.variants!r}")
    object.__setattr__(self, "variants", variants)
    for name, lo in (("num_needles", 1), ("value_digits", 1), ("min_length", 16)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"data.retrieval.{name} must be an integer >= {lo}, got {v!r}")
    if not isinstance(self.answer_weight, (int, float)) or self.answer_weight <= 0:
      raise ValueError(f"data.retrieval.answer_weight must be > 0, got {self.answer_weight!r}")

  def check_length(self, seq_len: int) -> None:
    """The shortest episode of every variant, with its longest answer, must fit one window of
    seq_len + 1 bytes."""
    if not self.fraction:
      return
    need = max(max(self.min_length, _shortest(v, self)) for v in self.variants)
    if need + self.max_answer + 1 > seq_len + 1:
      raise ValueError(f"data.seq_len={seq_len} is too short for data.retrieval episodes: "
                       f"the shortest prompt of {self.variants} takes {need} bytes plus an "
                       f"answer of {self.max_answer}; use data.seq_len >= "
                       f"{need + self.max_answer}")

  @property
  def max_answer(self) -> int:
    """Bytes of the longest answer (multi-value/-query answers list num_needles values)."""
    n = self.num_needles if set(self.variants) & {"multivalue", "multiquery"} else 1
    return n * (self.value_digits + 2)


class RetrievalMix:
  """A `data.make_batches` source: packed dict windows (see the module docstring) over the
  train (or eval) split of a `data.TextBytes`."""

  def __init__(self, text, cfg: RetrievalConfig):
    self.text, self.cfg = text, cfg

  def __repr__(self) -> str:
    return f"RetrievalMix({self.text!r}, {self.cfg})"

  def elements(self, length: int, seed: int, split: str):
    """(random-access dataset of `length`-token packed windows, a description of it)."""
    cut = self.text.respec(split=split)
    return _Windows(cut, self.cfg, length, seed, _SPLIT_ID[split]), repr(self)


class _Windows:
  def __init__(self, text, cfg: RetrievalConfig, length: int, seed: int, split_id: int):
    self._cfg, self._length, self._key = cfg, length, (seed, split_id)
    self._regions = [text.region(f) for f in range(len(text.paths))]
    # Sentence starts found once per file: episodes start their haystack at one.
    self._haystacks = [haystack.Haystack.of(np.asarray(r)) for r in self._regions]
    sizes = np.array([len(r) for r in self._regions], np.float64)
    self._p = sizes / sizes.sum()   # stretches drawn uniformly over the split's bytes

  def __len__(self) -> int:
    return _LENGTH

  def _file(self, rng: np.random.Generator) -> int:
    return int(rng.choice(len(self._regions), p=self._p))

  def _stretch(self, rng: np.random.Generator, n: int) -> np.ndarray:
    region = self._regions[self._file(rng)]
    n = min(n, len(region))
    start = int(rng.integers(0, len(region) - n + 1))
    return np.asarray(region[start:start + n], np.int32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([*self._key, int(index)])
    S, cfg = self._length, self._cfg
    if rng.random() >= cfg.fraction:
      return packing.single(self._stretch(rng, S))
    docs, weights, filled = [], [], 0
    while filled < S:
      longest = S - cfg.max_answer - 1
      variant = str(rng.choice(cfg.variants))
      shortest = min(max(cfg.min_length, _shortest(variant, cfg)), longest)
      # Log-uniform lengths: as many episodes per octave of length, so the short ones (many
      # per window, few distractors: where retrieval is learnt first) are common and every
      # length up to the window is still seen.
      n = int(np.exp(rng.uniform(np.log(shortest), np.log(longest + 1))))
      ep = haystack.make_episode(self._haystacks[self._file(rng)], n,
                                 _depths(rng, variant, cfg), rng, variant=variant,
                                 num_needles=cfg.num_needles, value_digits=cfg.value_digits)
      doc = np.frombuffer(ep.prompt + ep.answer + b"\n", np.uint8).astype(np.int32)
      w = np.ones(len(doc), np.float32)
      w[len(ep.prompt):len(ep.prompt) + len(ep.answer)] = cfg.answer_weight
      docs.append(doc)
      weights.append(w)
      filled += len(doc)
    return packing.pack(docs, S, weights)


def _shortest(variant: str, cfg: RetrievalConfig) -> int:
  """The variant's shortest prompt (`haystack.min_length`) with 16 bytes of haystack."""
  return haystack.min_length(variant, cfg.num_needles, value_digits=cfg.value_digits) + 16


def _depths(rng: np.random.Generator, variant: str, cfg: RetrievalConfig):
  """Needle depths, uniform in [0, 1]: one for a single needle, one per needle otherwise."""
  if variant == "single":
    return float(rng.random())
  return [float(x) for x in rng.random(cfg.num_needles)]
