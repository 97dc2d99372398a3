"""Fragments of the parameters and the static sync schedule of Streaming DiLoCo (SPEC.md §2).

A *fragment* is a set of parameter leaves that is synchronised as one unit: its outer gradient is
all-reduced together and it has its own outer copy and outer optimizer state. Streaming DiLoCo
(arXiv 2501.18512) builds fragments from transformer blocks, three blocks per fragment:

* *sequential*: fragment j holds blocks 3j, 3j+1, 3j+2;
* *strided* (the paper's default): with F layer-fragments, fragment j holds blocks j, j+F, j+2F, …

and the non-block parameters (embedding, final norm, unembedding) form one more fragment, the last
one, so P = F + 1.

A `Fragments` value only stores the fragment id of every leaf, in `jax.tree.leaves` order, so it
applies unchanged to every pytree with the params' structure: the outer copy, a worker-stacked
`[M, ...]` copy of the params, the outer gradients.

`Schedule` is the host-side timetable: fragment p has offset t_p = p·⌊H/P⌋ and is sent at the
steps t with t − t_p a positive multiple of H (its first sync comes after a full H inner steps),
and received τ steps later. It is pure Python, so the set of compiled programs stays small and
fixed.

Everything here is plain Python plus `jax.tree_util`; nothing touches a device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

PyTree = Any
KeyPath = tuple[Any, ...]

PATTERNS = ("strided", "sequential")
NON_BLOCK = "non-block"


# ----------------------------------------------------------------------------------------------
# Fragments.


@dataclasses.dataclass(frozen=True)
class Fragments:
  """An assignment of every parameter leaf to one of P fragments.

  Attributes:
    num_fragments: P, the number of fragments.
    leaf_fragment: the fragment id (0..P-1) of each leaf, in `jax.tree.leaves` order.
    names: one human-readable name per fragment, e.g. "blocks[0,8,16]" or "non-block".
  """

  num_fragments: int
  leaf_fragment: tuple[int, ...]
  names: tuple[str, ...]

  def __post_init__(self):
    # Coerce to tuples so the value stays hashable (it is static, host-side data).
    object.__setattr__(self, "leaf_fragment", tuple(int(i) for i in self.leaf_fragment))
    object.__setattr__(self, "names", tuple(str(n) for n in self.names))
    P = self.num_fragments
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
      raise ValueError(f"the number of fragments (P={P!r}) must be a positive integer")
    if len(self.names) != P:
      raise ValueError(f"got {len(self.names)} fragment names for P={P} fragments")
    _check_ids(self.leaf_fragment, P)

  def leaf_indices(self, p: int) -> tuple[int, ...]:
    """Positions (in `jax.tree.leaves` order) of the leaves of fragment p."""
    self._check_fragment(p)
    return tuple(i for i, f in enumerate(self.leaf_fragment) if f == p)

  def select(self, tree: PyTree, p: int) -> list:
    """The leaves of fragment p of `tree` (a pytree with the params' structure), in leaf order."""
    leaves = jax.tree.leaves(tree)
    self._check_leaf_count(len(leaves))
    return [leaves[i] for i in self.leaf_indices(p)]

  def merge_into(self, tree: PyTree, p: int, leaves: Sequence[Any]) -> PyTree:
    """`tree` with the leaves of fragment p replaced by `leaves` (in leaf order)."""
    old, treedef = jax.tree.flatten(tree)
    self._check_leaf_count(len(old))
    indices = self.leaf_indices(p)
    leaves = list(leaves)
    if len(leaves) != len(indices):
      raise ValueError(f"fragment {p} ({self.names[p]}) has {len(indices)} leaves, "
                       f"got {len(leaves)} to merge")
    new = list(old)
    for i, leaf in zip(indices, leaves):
      new[i] = leaf
    return jax.tree.unflatten(treedef, new)

  def sizes(self, tree: PyTree) -> tuple[int, ...]:
    """The number of elements of each fragment of `tree` (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree.leaves(tree)
    self._check_leaf_count(len(leaves))
    out = [0] * self.num_fragments
    for f, leaf in zip(self.leaf_fragment, leaves):
      out[f] += math.prod(_shape(leaf))
    return tuple(out)

  def _check_fragment(self, p: int) -> None:
    if not 0 <= p < self.num_fragments:
      raise ValueError(f"fragment id {p} is out of range 0..{self.num_fragments - 1}")

  def _check_leaf_count(self, n: int) -> None:
    if n != len(self.leaf_fragment):
      raise ValueError(f"the tree has {n} leaves but the fragments were built for "
                       f"{len(self.leaf_fragment)}: use a tree with the params' structure")


def by_blocks(params: PyTree, *, layers_per_fragment: int = 3, pattern: str = "strided",
              blocks_key: str = "blocks") -> Fragments:
  """Fragments of L transformer blocks, `layers_per_fragment` blocks each, plus the non-block part.

  The blocks sit at `params[blocks_key][i]` for i = 0..L-1 (the index may be an int dict key, a
  list position or a digit string; the blocks may also be nested under a wrapper such as
  `{"params": ...}`: the first path entry named `blocks_key` is taken). With
  F = L / layers_per_fragment layer-fragments:

  * "sequential": fragment j holds blocks j·k, …, j·k + k − 1 (k = layers_per_fragment);
  * "strided": fragment j holds blocks j, j + F, j + 2F, …

  Every leaf outside the blocks forms fragment F, the last one; P = F + 1 (P = F if there is no
  non-block leaf).

  Raises:
    ValueError: naming `diloco.fragment_pattern` for an unknown pattern, or
      `diloco.layers_per_fragment` when it does not divide L.
  """
  if pattern not in PATTERNS:
    raise ValueError(f"diloco.fragment_pattern must be one of {PATTERNS}, got {pattern!r}")
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  blocks = [_block_index(path, blocks_key) for path, _ in path_leaves]
  present = sorted({b for b in blocks if b is not None})
  if not present:
    raise ValueError(f"no transformer blocks found under the key {blocks_key!r}: expected "
                     f"params[{blocks_key!r}][i] for i = 0..L-1")
  L = len(present)
  if present != list(range(L)):
    raise ValueError(f"block indices under {blocks_key!r} must be 0..{L - 1}, got {present}")
  k = layers_per_fragment
  divisors = [d for d in range(1, L + 1) if L % d == 0]
  if not isinstance(k, int) or isinstance(k, bool) or k < 1 or L % k:
    raise ValueError(f"diloco.layers_per_fragment={k!r} must divide the number of blocks "
                     f"L={L}; allowed values: {divisors}")
  F = L // k
  if pattern == "strided":
    fragment_of_block = [b % F for b in range(L)]
  else:
    fragment_of_block = [b // k for b in range(L)]
  names = [
      f"{blocks_key}[{','.join(str(b) for b in range(L) if fragment_of_block[b] == j)}]"
      for j in range(F)
  ]
  has_non_block = any(b is None for b in blocks)
  if has_non_block:
    names.append(NON_BLOCK)
  leaf_fragment = tuple(F if b is None else fragment_of_block[b] for b in blocks)
  return Fragments(num_fragments=len(names), leaf_fragment=leaf_fragment, names=tuple(names))


def from_fn(params: PyTree, fn: Callable[[KeyPath, jax.Array], int]) -> Fragments:
  """Fragments from a user function `fn(key_path, leaf) -> fragment id`.

  The ids must cover 0..P-1 with no gap (P is inferred as the largest id plus one).
  """
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if not path_leaves:
    raise ValueError("params has no leaves to split into fragments")
  ids = []
  for path, leaf in path_leaves:
    f = fn(path, leaf)
    if not isinstance(f, (int, np.integer)) or isinstance(f, bool):
      raise ValueError(f"the fragment function must return an int, got {f!r} for "
                       f"{jax.tree_util.keystr(path)}")
    ids.append(int(f))
  P = max(ids) + 1
  _check_ids(ids, P)
  return Fragments(num_fragments=P, leaf_fragment=tuple(ids),
                   names=tuple(f"fragment {p}" for p in range(P)))


def single(params: PyTree) -> Fragments:
  """One fragment holding every leaf: P = 1, i.e. plain DiLoCo."""
  n = len(jax.tree.leaves(params))
  if n == 0:
    raise ValueError("params has no leaves to split into fragments")
  return Fragments(num_fragments=1, leaf_fragment=(0,) * n, names=("all",))


def split_out(frags: Fragments, params: PyTree, name: str,
              predicate: Callable[[KeyPath, Any], bool]) -> Fragments:
  """`frags` with the leaves for which predicate(key_path, leaf) holds moved into one more
  fragment, the last, called `name` (e.g. every MoE router, synced on its own period). Raises
  ValueError naming `name` when no leaf matches or a fragment would be left empty."""
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if len(path_leaves) != len(frags.leaf_fragment):
    raise ValueError(f"the tree has {len(path_leaves)} leaves but the fragments were built for "
                     f"{len(frags.leaf_fragment)}: use a tree with the params' structure")
  moved = [bool(predicate(path, leaf)) for path, leaf in path_leaves]
  if not any(moved):
    raise ValueError(f"no parameter belongs in the {name!r} fragment")
  P = frags.num_fragments
  ids = [P if m else f for f, m in zip(frags.leaf_fragment, moved)]
  empty = sorted(set(range(P)) - set(ids))
  if empty:
    raise ValueError(f"moving the {name!r} leaves out would leave fragment(s) "
                     f"{[frags.names[p] for p in empty]} empty")
  return Fragments(num_fragments=P + 1, leaf_fragment=tuple(ids), names=(*frags.names, name))


def _check_ids(ids: Sequence[int], P: int) -> None:
  bad = sorted({i for i in ids if not 0 <= i < P})
  if bad:
    raise ValueError(f"fragment ids must lie in 0..{P - 1}, got {bad}")
  unused = sorted(set(range(P)) - set(ids))
  if unused:
    raise ValueError(f"fragment ids must use every id in 0..{P - 1}; ids {unused} have no leaves")


def _key_entry(key: Any) -> Any:
  """The raw key of one path entry (dict key, sequence index or attribute name)."""
  if isinstance(key, jax.tree_util.DictKey):
    return key.key
  if isinstance(key, jax.tree_util.SequenceKey):
    return key.idx
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return key.key
  return key


def _block_index(path: KeyPath, blocks_key: str) -> int | None:
  """The block number of a leaf, or None when the leaf lies outside the blocks."""
  for pos, key in enumerate(path):
    if _key_entry(key) != blocks_key:
      continue
    if pos + 1 == len(path):
      raise ValueError(f"{jax.tree_util.keystr(path)} is a single leaf; by_blocks needs one "
                       f"subtree per block (params[{blocks_key!r}][i]), use from_fn instead")
    index = _key_entry(path[pos + 1])
    if isinstance(index, str) and index.isdigit():
      return int(index)
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool) and index >= 0:
      return int(index)
    raise ValueError(f"cannot read a block number from {jax.tree_util.keystr(path)}: expected "
                     f"an integer index after {blocks_key!r}")
  return None


def _shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else np.shape(leaf)


# ----------------------------------------------------------------------------------------------
# Schedule.


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The static sync timetable of Streaming DiLoCo (Algorithm 2, SPEC.md §2).

  t is the global inner-step counter, starting at 1. Fragment p has offset t_p = p·⌊H/P⌋; it is
  *sent* (its outer gradient starts its all-reduce) after inner step t when t − t_p is a positive
  multiple of H, so each fragment sees exactly H inner steps between its own syncs and its first
  sync comes after a full H steps. It is *received* (outer step and merge) τ steps later, after
  inner step t + τ. With H=100, P=2: fragment 0 syncs at 100, 200, …; fragment 1 at 150, 250, …

  A fragment may have its own period instead of H (`every`, e.g. the MoE routers synced every
  k steps, k dividing H): it is sent at k, 2k, … (offset 0) and takes no part in the staggering,
  so the other P' fragments have offsets j·⌊H/P'⌋ in their order. Then two fragments may be sent
  at the same step.

  Attributes:
    H: inner steps between two syncs of the same fragment (`diloco.inner_steps`).
    P: number of fragments.
    tau: overlap steps τ between a send and its receive (`diloco.overlap_steps`), 0 <= τ < H.
    every: () or one period per fragment (0: H, the staggered default).
  """

  H: int
  P: int
  tau: int = 0
  every: tuple[int, ...] = ()

  def __post_init__(self):
    for name, value in (("H", self.H), ("P", self.P), ("tau", self.tau)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"Schedule.{name} must be an integer, got {value!r}")
    if self.P < 1:
      raise ValueError(f"the number of fragments (P={self.P}) must be at least 1")
    object.__setattr__(self, "every", tuple(int(k) for k in self.every))
    if self.every and len(self.every) != self.P:
      raise ValueError(f"Schedule.every must give one period per fragment (P={self.P}), got "
                       f"{self.every!r}")
    staggered = len(self._staggered())
    if self.H < staggered:
      raise ValueError(f"diloco.inner_steps (H={self.H}) must be at least the number of "
                       f"fragments (P={staggered})")
    if not 0 <= self.tau < self.H:
      raise ValueError(f"diloco.overlap_steps (tau={self.tau}) must satisfy "
                       f"0 <= tau < diloco.inner_steps (H={self.H})")
    for k in self.every:
      if k and (k < 1 or self.H % k or self.tau >= k):
        raise ValueError(f"a fragment's own sync period ({k}) must divide diloco.inner_steps "
                         f"(H={self.H}) and exceed diloco.overlap_steps (tau={self.tau})")

  def _staggered(self) -> tuple[int, ...]:
    """The fragments on the H period, in order (all of them unless `every` says otherwise)."""
    return tuple(p for p in range(self.P) if not (self.every and self.every[p]))

  def period(self) -> int:
    """⌊H/P'⌋ (P' the staggered fragments): the spacing of the offsets."""
    return self.H // max(len(self._staggered()), 1)

  def sync_every(self, p: int) -> int:
    """Inner steps between two syncs of fragment p: H, or its own period."""
    return (self.every and self.every[p]) or self.H

  def offset(self, p: int) -> int:
    """t_p = j·⌊H/P'⌋ for the j-th staggered fragment; 0 for one with its own period."""
    if not 0 <= p < self.P:
      raise ValueError(f"fragment id {p} is out of range 0..{self.P - 1}")
    staggered = self._staggered()
    return staggered.index(p) * self.period() if p in staggered else 0

  def sends(self, t: int) -> tuple[int, ...]:
    """Fragments whose outer gradient is sent after inner step t: t − t_p ∈ {K, 2K, …}, K the
    fragment's period (H unless `every` says otherwise).

    The staggered offsets are distinct and below H, so at most one of those is sent per step.
    """
    out = []
    for p in range(self.P):
      d, K = t - self.offset(p), self.sync_every(p)
      if d >= K and d % K == 0:
        out.append(p)
    return tuple(out)

  def receives(self, t: int) -> tuple[int, ...]:
    """Fragments whose sync completes (outer step and merge) after inner step t: sent at t − τ."""
    return self.sends(t - self.tau)

  def last_send(self, p: int, t: int) -> int | None:
    """The step of fragment p's latest send at or before step t (None before its first)."""
    d, K = t - self.offset(p), self.sync_every(p)
    return t - d % K if d >= K else None

  def in_flight(self, t: int) -> tuple[int, ...]:
    """Fragments sent at some s <= t and not yet received after step t (i.e. s > t − τ).

    Ordered by send step, oldest first (the order they will be received). Because τ is below
    every period a fragment has at most one sync in flight; with τ >= ⌊H/P⌋ several fragments
    may be in flight.
    """
    sent = [(s, p) for p in range(self.P)
            if (s := self.last_send(p, t)) is not None and s > t - self.tau]
    return tuple(p for _, p in sorted(sent))
