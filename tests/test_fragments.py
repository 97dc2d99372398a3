"""Fragments of the params and the Streaming DiLoCo sync schedule (SPEC.md §2)."""

import jax
import numpy as np
import pytest

from diloco_jax import fragments


def fake_params(num_blocks=24, block_container=dict, index=int):
  """A transformer-shaped params dict; leaf values encode (block, leaf) so merges can be checked."""
  def block(b):
    return {
        "attn": {"qkv": np.full((2, 3), b, np.float32), "out": np.full((3, 2), b, np.float32)},
        "mlp": {"w_in": np.full((2, 4), b, np.float32), "w_out": np.full((4, 2), b, np.float32)},
        "norm": np.full((2,), b, np.float32),
    }
  if block_container is dict:
    blocks = {index(b): block(b) for b in range(num_blocks)}
  else:
    blocks = [block(b) for b in range(num_blocks)]
  return {
      "embed": np.zeros((5, 2), np.float32),
      "blocks": blocks,
      "final_norm": np.zeros((2,), np.float32),
      "unembed": np.zeros((2, 5), np.float32),
  }


def blocks_of(frags, params, p):
  """The set of block numbers among the leaves of fragment p (blocks leaves hold their number)."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  out = set()
  for i in frags.leaf_indices(p):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in paths[i]]
    if keys[0] == "blocks":
      out.add(int(keys[1]))
  return out


# ---- Schedule ------------------------------------------------------------------------------


def test_schedule_paper_example_h100_p2():
  s = fragments.Schedule(H=100, P=2)
  assert s.period() == 50
  assert (s.offset(0), s.offset(1)) == (0, 50)
  sent = {t: s.sends(t) for t in range(1, 301) if s.sends(t)}
  assert sent == {100: (0,), 150: (1,), 200: (0,), 250: (1,), 300: (0,)}


def test_schedule_h100_nine_fragments():
  s = fragments.Schedule(H=100, P=9)   # 8 layer-fragments (24 blocks / 3) + the non-block one
  assert s.period() == 11
  assert [s.offset(p) for p in range(9)] == [0, 11, 22, 33, 44, 55, 66, 77, 88]
  first = {}
  times = {p: [] for p in range(9)}
  for t in range(1, 1001):
    for p in s.sends(t):
      first.setdefault(p, t)
      times[p].append(t)
  assert [first[p] for p in range(9)] == [100, 111, 122, 133, 144, 155, 166, 177, 188]
  assert times[8][:3] == [188, 288, 388]
  for p in range(9):
    assert all(b - a == 100 for a, b in zip(times[p], times[p][1:])), p
  assert all(s.sends(t) == () for t in range(-5, 100))
  # At most one fragment per step; with tau=0 every send is received at once, nothing in flight.
  assert all(len(s.sends(t)) <= 1 for t in range(1, 1001))
  assert all(s.receives(t) == s.sends(t) and s.in_flight(t) == () for t in range(1, 1001))


def test_schedule_receives_tau1():
  s = fragments.Schedule(H=100, P=2, tau=1)
  received = {t: s.receives(t) for t in range(1, 302) if s.receives(t)}
  assert received == {101: (0,), 151: (1,), 201: (0,), 251: (1,), 301: (0,)}
  assert s.in_flight(99) == ()
  assert s.in_flight(100) == (0,)    # sent after step 100, received after step 101
  assert s.in_flight(101) == ()
  assert s.in_flight(150) == (1,)


def test_schedule_several_in_flight():
  s = fragments.Schedule(H=100, P=9, tau=25)   # tau >= H // P = 11: up to 3 fragments in flight
  assert s.receives(125) == (0,)
  assert s.receives(136) == (1,)
  assert s.receives(213) == (8,)               # sent at 188
  assert s.receives(225) == (0,)               # second sync of fragment 0, sent at 200
  assert s.in_flight(124) == (0, 1, 2)         # sent at 100, 111, 122
  assert s.in_flight(125) == (1, 2)            # fragment 0 received after step 125
  assert s.in_flight(210) == (8, 0)            # oldest first: sent at 188, then 200
  # Against a brute-force definition: sent at s <= t and received at s + tau > t.
  for t in range(1, 700):
    want = [p for u in range(1, t + 1) for p in s.sends(u) if u + s.tau > t]
    assert s.in_flight(t) == tuple(want), t
    assert 2 <= len(want) <= 3 or t < 150


def test_schedule_every_send_received_once():
  s = fragments.Schedule(H=30, P=5, tau=7)
  sends = [(t, p) for t in range(1, 500) for p in s.sends(t)]
  receives = [(t - s.tau, p) for t in range(1, 500 + s.tau) for p in s.receives(t)]
  assert sends == receives


def test_schedule_p1_is_diloco():
  s = fragments.Schedule(H=10, P=1)
  assert [t for t in range(1, 51) if s.sends(t)] == [10, 20, 30, 40, 50]


def test_schedule_errors():
  with pytest.raises(ValueError, match=r"diloco\.inner_steps \(H=4\) must be at least the number "
                     r"of fragments \(P=9\)"):
    fragments.Schedule(H=4, P=9)
  with pytest.raises(ValueError, match=r"diloco\.overlap_steps"):
    fragments.Schedule(H=100, P=9, tau=100)
  with pytest.raises(ValueError, match=r"diloco\.overlap_steps"):
    fragments.Schedule(H=100, P=9, tau=-1)
  with pytest.raises(ValueError, match="out of range"):
    fragments.Schedule(H=100, P=9).offset(9)


# ---- Fragments -----------------------------------------------------------------------------


def test_strided_and_sequential():
  params = fake_params()
  strided = fragments.by_blocks(params)
  sequential = fragments.by_blocks(params, pattern="sequential")
  for frags in (strided, sequential):
    assert frags.num_fragments == 9
    assert frags.names[8] == "non-block"
    assert len(frags.leaf_fragment) == len(jax.tree.leaves(params))
  assert blocks_of(strided, params, 0) == {0, 8, 16}
  assert blocks_of(strided, params, 7) == {7, 15, 23}
  assert blocks_of(sequential, params, 0) == {0, 1, 2}
  assert blocks_of(sequential, params, 7) == {21, 22, 23}
  assert strided.names[0] == "blocks[0,8,16]"
  assert sequential.names[1] == "blocks[3,4,5]"
  non_block = strided.select(params, 8)
  assert [x.shape for x in non_block] == [(5, 2), (2,), (2, 5)]   # embed, final_norm, unembed
  assert blocks_of(strided, params, 8) == set()


def test_every_leaf_in_exactly_one_fragment():
  params = fake_params()
  frags = fragments.by_blocks(params)
  n = len(jax.tree.leaves(params))
  all_indices = [i for p in range(frags.num_fragments) for i in frags.leaf_indices(p)]
  assert sorted(all_indices) == list(range(n))
  assert all(len(frags.leaf_indices(p)) == 3 * 5 for p in range(8))
  sizes = frags.sizes(params)
  assert sum(sizes) == sum(x.size for x in jax.tree.leaves(params))
  assert sizes == (3 * (6 + 6 + 8 + 8 + 2),) * 8 + (10 + 2 + 10,)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert frags.sizes(shapes) == sizes


def test_select_merge_round_trip():
  params = fake_params()
  frags = fragments.by_blocks(params)
  for p in range(frags.num_fragments):
    assert jax.tree.all(jax.tree.map(np.array_equal, frags.merge_into(params, p,
                                                                      frags.select(params, p)),
                                     params))
  new = frags.merge_into(params, 0, [x + 100 for x in frags.select(params, 0)])
  assert jax.tree.structure(new) == jax.tree.structure(params)
  for p in range(frags.num_fragments):
    for a, b in zip(frags.select(new, p), frags.select(params, p)):
      np.testing.assert_array_equal(a, b + 100 if p == 0 else b)
  # Works on any tree with the params' structure, e.g. a worker-stacked [M, ...] copy.
  stacked = jax.tree.map(lambda x: np.stack([x, x + 1]), params)
  assert [x.shape for x in frags.select(stacked, 8)] == [(2, 5, 2), (2, 2), (2, 2, 5)]
  with pytest.raises(ValueError, match="leaves"):
    frags.merge_into(params, 0, frags.select(params, 0)[:-1])
  with pytest.raises(ValueError, match="leaves"):
    frags.select({"a": np.zeros(2)}, 0)


@pytest.mark.parametrize("container,index", [(dict, int), (dict, str), (list, int)])
def test_block_key_kinds(container, index):
  params = fake_params(6, container, index)
  frags = fragments.by_blocks(params, layers_per_fragment=2)
  assert frags.num_fragments == 4
  assert frags.names == ("blocks[0,3]", "blocks[1,4]", "blocks[2,5]", "non-block")
  assert blocks_of(frags, params, 2) == {2, 5}


def test_no_non_block_leaves():
  params = {"blocks": fake_params(6)["blocks"]}
  frags = fragments.by_blocks(params, pattern="sequential")
  assert frags.num_fragments == 2
  assert frags.names == ("blocks[0,1,2]", "blocks[3,4,5]")


def test_from_fn_and_single():
  params = fake_params(4)
  frags = fragments.from_fn(params, lambda path, leaf: int(leaf.ndim == 1))
  assert frags.num_fragments == 2
  assert all(x.ndim == 1 for x in frags.select(params, 1))
  assert all(x.ndim == 2 for x in frags.select(params, 0))
  one = fragments.single(params)
  assert one.num_fragments == 1
  assert one.leaf_indices(0) == tuple(range(len(jax.tree.leaves(params))))
  assert one.sizes(params) == (sum(x.size for x in jax.tree.leaves(params)),)


def test_errors():
  params = fake_params()
  with pytest.raises(ValueError, match=r"diloco\.layers_per_fragment.*L=24.*\[1, 2, 3, 4, 6, 8, "
                     r"12, 24\]"):
    fragments.by_blocks(params, layers_per_fragment=5)
  with pytest.raises(ValueError, match=r"diloco\.layers_per_fragment"):
    fragments.by_blocks(params, layers_per_fragment=0)
  with pytest.raises(ValueError, match=r"diloco\.fragment_pattern"):
    fragments.by_blocks(params, pattern="random")
  with pytest.raises(ValueError, match="no transformer blocks"):
    fragments.by_blocks({"w": np.zeros(2)})
  with pytest.raises(ValueError, match=r"0\.\.2"):
    fragments.by_blocks({"blocks": {0: np.zeros(2), 1: np.zeros(2), 3: np.zeros(2)}},
                        layers_per_fragment=1)
  with pytest.raises(ValueError, match=r"ids \[1\] have no leaves"):
    fragments.from_fn(params, lambda path, leaf: 2 * int(leaf.ndim == 1))
  with pytest.raises(ValueError, match="must return an int"):
    fragments.from_fn(params, lambda path, leaf: "a")


# ---- a fragment on its own period (the MoE routers) -----------------------------------------
def test_schedule_with_a_fragment_on_its_own_period():
  # Three staggered fragments (H=30: offsets 0, 10, 20) and a router fragment every 10 steps.
  s = fragments.Schedule(H=30, P=4, tau=1, every=(0, 0, 0, 10))
  assert [s.offset(p) for p in range(4)] == [0, 10, 20, 0]
  assert [s.sync_every(p) for p in range(4)] == [30, 30, 30, 10]
  sent = {t: s.sends(t) for t in range(1, 61) if s.sends(t)}
  assert sent == {10: (3,), 20: (3,), 30: (0, 3), 40: (1, 3), 50: (2, 3), 60: (0, 3)}
  assert s.receives(31) == (0, 3) and s.in_flight(30) == (0, 3)
  with pytest.raises(ValueError, match=r"sync period \(7\) must divide diloco.inner_steps"):
    fragments.Schedule(H=30, P=2, every=(0, 7))
  with pytest.raises(ValueError, match=r"exceed diloco.overlap_steps \(tau=5\)"):
    fragments.Schedule(H=30, P=2, tau=5, every=(0, 5))


def test_split_out_moves_the_routers_into_their_own_fragment():
  moe = lambda: {"router": np.zeros((4, 2)), "experts_up": np.zeros((2, 4, 8))}
  params = {"blocks": {0: {"attn": np.zeros(3), "mlp": moe()},
                       1: {"attn": np.zeros(3), "mlp": moe()}}, "embed": np.zeros(5)}
  by_block = fragments.by_blocks(params, layers_per_fragment=1)
  is_router = lambda path, leaf: path[-1].key == "router"
  # by_blocks keeps each block's router with its experts (the same fragment).
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  ids = dict(zip((jax.tree_util.keystr(p) for p, _ in leaves), by_block.leaf_fragment))
  assert ids["['blocks'][0]['mlp']['router']"] == ids["['blocks'][0]['mlp']['experts_up']"] == 0
  f = fragments.split_out(by_block, params, "router", is_router)
  assert f.names == ("blocks[0]", "blocks[1]", "non-block", "router")
  ids = dict(zip((jax.tree_util.keystr(p) for p, _ in leaves), f.leaf_fragment))
  assert ids["['blocks'][0]['mlp']['router']"] == ids["['blocks'][1]['mlp']['router']"] == 3
  assert ids["['blocks'][1]['mlp']['experts_up']"] == 1
  with pytest.raises(ValueError, match="no parameter belongs in the 'gate' fragment"):
    fragments.split_out(by_block, params, "gate", lambda path, leaf: False)
  with pytest.raises(ValueError, match=r"would leave fragment\(s\) \['non-block'\] empty"):
    fragments.split_out(by_block, params, "embed", lambda path, leaf: path[0].key == "embed")
