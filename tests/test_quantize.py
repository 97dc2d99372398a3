"""Codec properties: representable values, nearest and stochastic rounding, packing, bit counts.

Reference grids and neighbours are computed here in NumPy (ml_dtypes for float8), independently
of the jnp implementation, so a wrong grid or a wrong rounding rule fails.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from diloco_jax import quantize as Q

BLOCK_CODECS = ("fp8_e4m3", "fp4_e2m1", "fp4_e3m0")
LOSSY_CODECS = ("bf16",) + BLOCK_CODECS

_E3M0 = np.array([0.0] + [2.0 ** (e - 7) for e in range(1, 8)], np.float32)
_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
_all8 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
_E4M3 = np.unique(_all8[np.isfinite(_all8) & (_all8 >= 0)])  # 127 magnitudes, max 448
GRIDS = {"fp8_e4m3": _E4M3, "fp4_e2m1": _E2M1, "fp4_e3m0": _E3M0}


def ref_neighbours(y, grid):
  """Grid magnitudes lo <= y <= hi (y >= 0, y <= grid max)."""
  i = np.searchsorted(grid, y, side="right") - 1
  return grid[i], grid[np.minimum(i + 1, len(grid) - 1)]


def ref_blocks(x, codec, scales):
  """(x padded as [nb, B], y = |x| / scale) for the codec's float32 block scales, after checking
  them against the spec's amax / g_max (XLA may divide by the constant g_max with one rounding
  more, by multiplying by its reciprocal: allow 1 ulp)."""
  x = np.asarray(x, np.float32).ravel()
  b = codec.block_size
  nb = -(-x.size // b)
  xb = np.pad(x, (0, nb * b - x.size)).reshape(nb, b)
  scales = np.asarray(scales)
  assert scales.dtype == np.float32 and scales.shape == (nb,)
  np.testing.assert_allclose(scales, np.abs(xb).max(axis=1) / GRIDS[codec.name][-1], rtol=1.2e-7)
  safe = np.where(scales > 0, scales, np.float32(1))[:, None]
  y = np.minimum(np.abs(xb) / safe, GRIDS[codec.name][-1])
  return xb, y.astype(np.float32)


def wide_data(key, shape):
  """Normal values times log-normal magnitudes: many binades inside each block."""
  k1, k2 = jax.random.split(key)
  return np.asarray(jax.random.normal(k1, shape) * jnp.exp(2.0 * jax.random.normal(k2, shape)))


# ----------------------------------------------------------------------------- exact values


def test_e3m0_decodes_all_codes_to_spec_grid():
  codec = Q.get_codec("fp4_e3m0", block_size=16)
  enc = Q.Encoded(Q.pack_nibbles(jnp.arange(16, dtype=jnp.uint8)), jnp.array([1.0]))
  got = np.asarray(codec.decode(enc, (16,)))
  expected = [0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]
  np.testing.assert_array_equal(got[:8], expected)  # bits 0-2 = e, 2^(e-7)
  np.testing.assert_array_equal(got[8:], -np.array(expected))  # bit 3 = sign
  assert set(got.tolist()) == {0.0} | {s * 2.0**-k for s in (1, -1) for k in range(7)}
  # Scale 2.5 multiplies every value; re-encoding a decoded grid is a fixed point.
  enc = enc._replace(scales=jnp.array([2.5]))
  got = codec.decode(enc, (16,))
  np.testing.assert_array_equal(got[:8], 2.5 * np.array(expected))
  np.testing.assert_array_equal(codec.roundtrip(got), got)


def test_e2m1_decodes_all_codes_to_ocp_set_and_codes_are_ocp_bits():
  codec = Q.get_codec("fp4_e2m1", block_size=16)
  enc = Q.Encoded(Q.pack_nibbles(jnp.arange(16, dtype=jnp.uint8)), jnp.array([1.0]))
  got = np.asarray(codec.decode(enc, (16,)))
  np.testing.assert_array_equal(got[:8], [0, 0.5, 1, 1.5, 2, 3, 4, 6])
  np.testing.assert_array_equal(got[8:], -np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6]))
  # A block whose max is 6 has scale 1 and encodes the OCP values to their bit patterns.
  x = jnp.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6], jnp.float32)
  enc = codec.encode(x)
  assert float(enc.scales[0]) == 1.0
  np.testing.assert_array_equal(Q.unpack_nibbles(enc.payload),
                                [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15])
  np.testing.assert_array_equal(codec.decode(enc, x.shape), x)


def test_e3m0_codes_on_hand_values():
  codec = Q.get_codec("fp4_e3m0", block_size=8)
  x = jnp.array([1.0, -1.0, 0.5, -1 / 64, 0.01, 0.0, -0.001, 0.25])
  np.testing.assert_array_equal(Q.unpack_nibbles(codec.encode(x).payload),
                                [7, 15, 6, 9, 1, 0, 0, 5])  # negatives rounding to 0 -> code 0


def test_fp8_values_are_e4m3fn_times_scale():
  codec = Q.get_codec("fp8_e4m3", block_size=32)
  x = wide_data(jax.random.key(0), (256,))
  enc = codec.encode(x)
  assert enc.payload.dtype == jnp.float8_e4m3fn and enc.payload.shape == (256,)
  ref_blocks(x, codec, enc.scales)
  scales = np.asarray(enc.scales)
  g = np.asarray(codec.decode(enc, x.shape)).reshape(8, 32) / scales[:, None]
  np.testing.assert_allclose(np.abs(g), _E4M3[np.abs(_E4M3[None, None] - np.abs(g)[..., None])
                                                .argmin(-1)], rtol=1e-6)
  # Every finite e4m3fn value (both signs) in one block with max 448: exact round trip.
  grid = np.concatenate([_E4M3, -_E4M3[1:]])
  codec = Q.get_codec("fp8_e4m3", block_size=grid.size)
  np.testing.assert_array_equal(codec.roundtrip(grid), grid)


def test_bf16_is_the_cast():
  codec = Q.get_codec("bf16")
  x = jnp.asarray(wide_data(jax.random.key(1), (7, 9)))
  enc = codec.encode(x)
  assert enc.payload.dtype == jnp.bfloat16 and enc.scales.shape == (0,)
  np.testing.assert_array_equal(enc.payload, x.ravel().astype(jnp.bfloat16))
  np.testing.assert_array_equal(codec.roundtrip(x), x.astype(jnp.bfloat16).astype(jnp.float32))


def test_fp32_is_bit_identical():
  codec = Q.get_codec("fp32")
  x = jnp.array([1.0, -0.0, 1e-40, -3.4e38, 0.1, np.nan], jnp.float32)
  assert codec.roundtrip(x) is x
  enc = codec.encode(x)
  assert enc.payload.dtype == jnp.float32 and enc.scales.shape == (0,)
  np.testing.assert_array_equal(np.asarray(codec.decode(enc, x.shape)).view(np.uint32),
                                np.asarray(x).view(np.uint32))


# ----------------------------------------------------------------------------- nearest


@pytest.mark.parametrize("name, x, expected", [
    # E3M0, block max 1: linear midpoints 0.75, 0.375, 3/32, 1/128 are ties -> away from zero.
    ("fp4_e3m0",
     [1.0, 0.75, 0.74, 0.76, 0.3, 0.375, 0.007, 1 / 128, -0.75, 0.003, -0.2, 3 / 32, 0, -1 / 64,
      0.02, 0.5],
     [1.0, 1.0, 0.5, 1.0, 0.25, 0.5, 0.0, 1 / 64, -1.0, 0.0, -0.25, 0.125, 0, -1 / 64, 1 / 64,
      0.5]),
    # E2M1, block max 6: ties 5, 3.5, 2.5, 0.25, -1.25, 0.75 go up in magnitude; 0.24 -> 0.
    ("fp4_e2m1",
     [6, 5, 4.9, 3.5, 2.5, 0.25, 0.24, -1.25, 1.2, -5.1, 0.75, 2.9],
     [6, 6, 4, 4, 3, 0.5, 0, -1.5, 1, -6, 1, 3]),
    # e4m3fn, block max 448: 17 ties 16|18 (even would give 16), 2^-10 ties 0|2^-9 (even: 0),
    # 2^-11 is below half the smallest subnormal, 440 > 432 = midpoint of 416|448, 100.5 -> 104.
    ("fp8_e4m3",
     [448, 17, 2**-10, 2**-11, 440, -0.3, 0, 100.5],
     [448, 18, 2**-9, 0, 448, -0.3125, 0, 104]),
])
def test_nearest_rounding_hand_values(name, x, expected):
  x = np.asarray(x, np.float32)
  codec = Q.get_codec(name, block_size=x.size)
  np.testing.assert_array_equal(codec.roundtrip(x), np.asarray(expected, np.float32))


def test_bf16_nearest_is_round_to_nearest_even():
  # 1 + 2^-8 and 1 + 3 * 2^-8 are ties; RNE picks the even mantissa.
  x = jnp.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20], jnp.float32)
  np.testing.assert_array_equal(Q.get_codec("bf16").roundtrip(x),
                                [1.0, 1 + 2**-6, 1 + 2**-7])


@pytest.mark.parametrize("name", BLOCK_CODECS)
@pytest.mark.parametrize("block_size", [32, 6])
def test_error_bound_and_exact_nearest_on_random_data(name, block_size):
  codec = Q.get_codec(name, block_size=block_size)
  x = wide_data(jax.random.key(2), (5, 37))  # 185 values: last block padded
  enc = codec.encode(x)
  xb, y = ref_blocks(x, codec, enc.scales)
  scales = np.asarray(enc.scales)
  q = np.asarray(codec.roundtrip(x))
  assert q.shape == x.shape
  lo, hi = ref_neighbours(y, GRIDS[name])
  # Per-element bound: half the local grid gap times the block scale (float32 slack only).
  n = x.size
  err = np.abs(xb.ravel()[:n] - q.ravel())
  # Slack: the float32 scale carries a relative rounding of ~2^-23 (at the block max the gap is
  # 0, and g_max * (amax / g_max) need not round back to amax).
  slack = (2.0**-21 * scales * GRIDS[name][-1])[:, None]
  bound = (0.5 * (hi - lo) * scales[:, None] + slack).ravel()[:n]
  assert np.all(err <= bound), np.max(err - bound)
  # And exactly the nearest grid point (ties up) of the scaled value, times the scale.
  nearest = np.where(hi - y <= y - lo, hi, lo) * np.sign(xb) * scales[:, None]
  np.testing.assert_array_equal(q.ravel(), nearest.ravel()[:n])


def test_error_bound_bf16_and_fp32():
  x = wide_data(jax.random.key(3), (300,))
  q = np.asarray(Q.get_codec("bf16").roundtrip(x))
  # bf16 keeps 8 significant bits: |x - q| <= 2^-8 |x| (half an ulp of 2^(E-7)).
  assert np.all(np.abs(x - q) <= 2.0**-8 * np.abs(x))
  np.testing.assert_array_equal(Q.get_codec("fp32").roundtrip(x), x)


# ----------------------------------------------------------------------------- stochastic


def _stochastic_neighbours(name, x, codec):
  """Per element (lo, hi) decoded values and the block-scaled gap, from the reference grids."""
  if name == "bf16":
    bits = np.asarray(x, np.float32).view(np.uint32)
    lo = (bits & np.uint32(0xFFFF0000)).view(np.float32)  # truncation toward zero
    hi = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return lo, hi
  scales = np.asarray(codec.encode(x, jax.random.key(0)).scales)
  xb, y = ref_blocks(x, codec, scales)
  lo, hi = ref_neighbours(y, GRIDS[name])
  s = np.sign(xb) * scales[:, None]
  return (lo * s).ravel()[:x.size], (hi * s).ravel()[:x.size]


@pytest.mark.parametrize("name", LOSSY_CODECS)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(name):
  codec = Q.get_codec(name, block_size=32, stochastic=True)
  x = wide_data(jax.random.key(4), (64,)).astype(np.float32)
  draws = 4000
  keys = jax.random.split(jax.random.key(5), draws)
  q = np.asarray(jax.jit(jax.vmap(codec.roundtrip, in_axes=(None, 0)))(x, keys))
  lo, hi = _stochastic_neighbours(name, x, codec)
  assert np.all((q == lo) | (q == hi))
  p = np.where(hi != lo, (x - lo) / np.where(hi != lo, hi - lo, 1), 0).astype(np.float64)
  assert np.all((p >= 0) & (p <= 1))
  np.testing.assert_allclose((q == hi).mean(0)[hi != lo], p[hi != lo], atol=0.05)
  # CLT: the mean of `draws` Bernoulli(p) choices between lo and hi has std
  # sqrt(p (1 - p) / draws) |hi - lo|; allow 5 of them plus float32 rounding of x itself.
  sigma = np.sqrt(p * (1 - p) / draws) * np.abs(hi.astype(np.float64) - lo)
  err = np.abs(q.astype(np.float64).mean(0) - x)
  assert np.all(err <= 5 * sigma + 1e-6 * np.abs(x)), np.max(err / (sigma + 1e-30))
  # Nearest rounding would be biased here: the test can tell the two apart.
  qn = np.asarray(Q.get_codec(name, block_size=32).roundtrip(x))
  assert np.any(np.abs(qn - x) > 5 * sigma + 1e-6 * np.abs(x))


@pytest.mark.parametrize("name", LOSSY_CODECS)
def test_stochastic_is_deterministic_given_the_key(name):
  codec = Q.get_codec(name, block_size=32, stochastic=True)
  x = wide_data(jax.random.key(6), (64,))
  a = codec.encode(x, jax.random.key(7))
  b = codec.encode(x, jax.random.key(7))
  c = codec.encode(x, jax.random.key(8))
  as_bytes = lambda e: np.asarray(e.payload).view(np.uint8)
  np.testing.assert_array_equal(as_bytes(a), as_bytes(b))
  np.testing.assert_array_equal(a.scales, b.scales)
  assert np.any(as_bytes(a) != as_bytes(c))


def test_stochastic_needs_a_key():
  with pytest.raises(ValueError, match="rng"):
    Q.get_codec("fp4_e3m0", stochastic=True).encode(jnp.ones(4))


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [10, 11, 64])
def test_pack_nibbles_round_trip(n):
  codes = jax.random.randint(jax.random.key(n), (n,), 0, 16).astype(jnp.uint8)
  packed = Q.pack_nibbles(codes)
  assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(n / 2),)
  np.testing.assert_array_equal(Q.unpack_nibbles(packed, n), codes)
  if n % 2:
    assert int(Q.unpack_nibbles(packed)[-1]) == 0  # the pad code


def test_pack_nibbles_layout_low_nibble_first():
  np.testing.assert_array_equal(Q.pack_nibbles(jnp.array([1, 2, 15, 0], jnp.uint8)), [0x21, 0x0F])
  np.testing.assert_array_equal(Q.unpack_nibbles(jnp.array([0xA3], jnp.uint8)), [3, 10])
  batched = Q.pack_nibbles(jnp.array([[1, 2], [3, 4]], jnp.uint8))  # along the last axis
  np.testing.assert_array_equal(batched, [[0x21], [0x43]])


@pytest.mark.parametrize("name", ("fp4_e2m1", "fp4_e3m0"))
def test_fp4_payload_is_packed_uint8(name):
  enc = Q.get_codec(name, block_size=32).encode(jnp.linspace(-1, 1, 96))
  assert enc.payload.dtype == jnp.uint8 and enc.payload.shape == (48,)
  assert enc.scales.dtype == jnp.float32 and enc.scales.shape == (3,)


# ----------------------------------------------------------------------------- bit counts


@pytest.mark.parametrize("name", Q.CODECS)
@pytest.mark.parametrize("n, block_size", [(64, 32), (96, 16), (40, 2)])
def test_wire_bits_equal_encoded_bytes(name, n, block_size):
  codec = Q.get_codec(name, block_size=block_size)
  enc = codec.encode(jnp.linspace(-3, 2, n))
  actual = 8 * (enc.payload.nbytes + enc.scales.nbytes)
  assert codec.wire_bits(n) == actual == codec.payload_bits(n)


def test_wire_bits_values():
  assert [Q.get_codec(c).wire_bits(64) for c in Q.CODECS] == [2048, 1024, 576, 320, 320]
  assert [Q.get_codec(c).bits for c in Q.CODECS] == [32, 16, 8, 4, 4]
  assert Q.get_codec("fp8_e4m3", block_size=3).wire_bits(9) == 9 * 8 + 3 * 32
  # n not a multiple of B: the spec count vs what encode sends (one padded block).
  codec = Q.get_codec("fp4_e3m0", block_size=32)
  assert codec.wire_bits(40) == 40 * 4 + 2 * 32
  enc = codec.encode(jnp.ones(40))
  assert codec.payload_bits(40) == 8 * (enc.payload.nbytes + enc.scales.nbytes) == 64 * 4 + 64


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", Q.CODECS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_zero_block_decodes_to_zeros(name, stochastic):
  codec = Q.get_codec(name, block_size=32, stochastic=stochastic)
  x = jnp.concatenate([jnp.zeros(32), jnp.linspace(-1, 1, 32)])
  rng = jax.random.key(9) if stochastic else None
  enc = codec.encode(x, rng)
  q = np.asarray(codec.decode(enc, x.shape))
  assert not np.any(np.isnan(q))
  np.testing.assert_array_equal(q[:32], 0.0)
  if name in BLOCK_CODECS:
    assert float(enc.scales[0]) == 0.0
  np.testing.assert_array_equal(codec.roundtrip(jnp.zeros(64), rng), np.zeros(64))


@pytest.mark.parametrize("name", Q.CODECS)
def test_shapes_and_dtypes_restored(name):
  codec = Q.get_codec(name, block_size=32)
  x = jnp.asarray(wide_data(jax.random.key(10), (3, 7, 5)))  # 105 = 3 * 32 + 9
  q = codec.roundtrip(x)
  assert q.shape == (3, 7, 5) and q.dtype == jnp.float32
  assert codec.roundtrip(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  assert float(Q.relative_error(x, q)) < {"fp32": 1e-30, "bf16": 4e-3, "fp8_e4m3": 0.07,
                                          "fp4_e2m1": 0.3, "fp4_e3m0": 0.4}[name]


@pytest.mark.parametrize("name", LOSSY_CODECS)
def test_vmap_over_workers_and_jit_match_per_worker(name):
  codec = Q.get_codec(name, block_size=32, stochastic=True)
  workers = 3
  x = wide_data(jax.random.key(11), (workers, 64))
  keys = jax.random.split(jax.random.key(12), workers)

  def roundtrip(x, key):
    enc = codec.encode(x, key)
    return enc, codec.decode(enc, x.shape)

  enc, q = jax.jit(jax.vmap(roundtrip))(x, keys)
  payload, scales = np.asarray(enc.payload).view(np.uint8), np.asarray(enc.scales)
  assert payload.shape[0] == scales.shape[0] == q.shape[0] == workers
  for m in range(workers):
    one = codec.encode(x[m], keys[m])
    np.testing.assert_array_equal(payload[m], np.asarray(one.payload).view(np.uint8))
    np.testing.assert_array_equal(scales[m], one.scales)
    np.testing.assert_array_equal(q[m], codec.decode(one, (64,)))


def test_relative_error():
  assert float(Q.relative_error(jnp.array([3.0, 4.0]), jnp.array([3.0, 0.0]))) == np.float32(0.8)
  assert float(Q.relative_error(jnp.zeros(3), jnp.zeros(3))) == 0.0


# ----------------------------------------------------------------------------- validation


def test_invalid_codec_name():
  with pytest.raises(ValueError, match=r"diloco\.codec must be one of .*got 'fp5'"):
    Q.get_codec("fp5")


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True])
def test_invalid_block_size(block_size):
  with pytest.raises(ValueError, match=r"diloco\.codec_block_size"):
    Q.get_codec("fp8_e4m3", block_size=block_size)


def test_fp4_needs_even_block_size():
  with pytest.raises(ValueError, match=r"diloco\.codec_block_size must be even"):
    Q.Codec("fp4_e3m0", block_size=3)
  assert Q.Codec("fp8_e4m3", block_size=3).block_size == 3
