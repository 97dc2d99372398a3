"""Codecs for outer gradients: quantize, dequantize, pack, and count the bits on the wire.

Streaming DiLoCo (arXiv 2501.18512) sends each worker's *unreduced* fragment outer gradient
Δ_m = θ_outer − θ_m in a low-precision format and accumulates the mean in fp32 (SPEC §3). A
`Codec` turns a float array into an `Encoded` (the arrays that travel) and back.

Codecs (the value of the `diloco.codec` config key):

  ========== ==== ============================================================= ==========
  name       bits grid of magnitudes g (decoded value = ±g · scale)            scale
  ========== ==== ============================================================= ==========
  fp32        32  x itself (identity)                                           none
  bf16        16  x rounded to bfloat16, round-to-nearest-even (a plain cast)   none
  fp8_e4m3     8  finite float8_e4m3fn values, max 448                          amax / 448
  fp4_e2m1     4  OCP FP4 {0, 0.5, 1, 1.5, 2, 3, 4, 6}                          amax / 6
  fp4_e3m0     4  {0} ∪ {2^(e−7) : e = 1..7} = {0, 1/64, 1/32, …, 1/2, 1}       amax
  ========== ==== ============================================================= ==========

Blocks. The three scaled codecs flatten x, pad it with zeros to a multiple of `block_size` B,
and give every block b its own scale s_b = amax_b / g_max, where amax_b = max_{i∈b} |x_i| and
g_max is the largest grid magnitude. So the block's largest element lands exactly on g_max: for
E3M0 the decoded magnitudes of a block are {0, amax/64, amax/32, …, amax/2, amax} (SPEC §3,
"ours"). A block with amax_b = 0 has s_b = 0 and decodes to zeros (no 0/0).

Scales are stored as float32 (32 bits each). bf16 scales would save 16 bits per block
(0.5 bit/value at B=32) but round s_b, so the block max would no longer decode to itself and
could even exceed the largest grid point; float32 keeps E3M0's decode exact (s_b · 2^(e−7) is
a power-of-two multiple of amax) and costs 1 bit/value at B=32.

Rounding. Let y = |x| / s_b ∈ [0, g_max] and lo ≤ y ≤ hi the neighbouring grid magnitudes
(lo = hi when y is on the grid). The grids are minifloats: with m mantissa bits and smallest
normal exponent e_min, the spacing near y is

    step(y) = 2^(max(⌊log2 y⌋, e_min) − m),   lo = ⌊y / step⌋ · step,   hi = min(lo + step, g_max)

(e4m3fn: m=3, e_min=−6; E2M1: m=1, e_min=0; E3M0: m=0, e_min=−6, whose "subnormal" range is just
{0, 1/64}). Then

  * nearest (default): q = hi if (hi − y) ≤ (y − lo) else lo. "Nearest" is in *linear*
    distance, also on E3M0's geometric grid: between 2^k and 2^(k+1) the decision point is the
    arithmetic midpoint 1.5 · 2^k, and between 0 and 1/64 it is 1/128. Ties go to hi, i.e. away
    from zero; e.g. E3M0 rounds 0.75·amax to amax and amax/128 to amax/64, and anything below
    amax/128 to 0.
  * stochastic (`stochastic=True`): q = hi with probability p = (y − lo) / (hi − lo), else lo.
    Then E[q] = lo + p (hi − lo) = y, so E[decode(encode(x))] = x for every x (every x is in
    range, since the scale maps the block max onto the grid), and q is always one of the two
    neighbours.

bf16 has no scale: nearest is the round-to-nearest-even cast; stochastic adds 16 uniform random
bits below the bf16 mantissa of the float32 pattern and truncates, which rounds the magnitude up
with probability equal to the discarded fraction (unbiased). fp32 is the identity.

Wire format (`Encoded`):
  * fp32: payload float32 [n]; bf16: payload bfloat16 [n]; scales float32 [0] (empty).
  * fp8_e4m3: payload float8_e4m3fn [n_pad]; scales float32 [n_pad / B].
  * fp4_*: 4-bit codes, bit 3 = sign, bits 0–2 = magnitude index (E2M1: the index into
    (0, 0.5, 1, 1.5, 2, 3, 4, 6), which is the OCP bit pattern; E3M0: e), packed two per
    byte by `pack_nibbles` (first code in the low nibble): payload uint8 [n_pad / 2];
    scales float32 [n_pad / B]. B must be even so that blocks never share a byte.

Bits for n values (SPEC §3): `wire_bits(n) = n · bits + ⌈n / B⌉ · 32` (no scale term for
fp32/bf16). When B divides n this is exactly 8 × (payload.nbytes + scales.nbytes);
`payload_bits(n)` counts the padded arrays that encode really returns, for any n.

Example:

  >>> import jax.numpy as jnp
  >>> codec = get_codec("fp4_e3m0", block_size=4)
  >>> codec.roundtrip(jnp.array([1.0, 0.75, 0.3, -0.007]))
  Array([1.  , 1.  , 0.25, 0.  ], dtype=float32)
  >>> codec.wire_bits(4)
  48

Everything is pure jnp: jit-able, and vmap-able over a leading worker axis (pass one rng key
per worker when stochastic).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CODECS = ("fp32", "bf16", "fp8_e4m3", "fp4_e2m1", "fp4_e3m0")

_BITS = {"fp32": 32, "bf16": 16, "fp8_e4m3": 8, "fp4_e2m1": 4, "fp4_e3m0": 4}
SCALE_DTYPE = jnp.float32
SCALE_BITS = 32


class _Minifloat(NamedTuple):
  """A sign-magnitude float grid: `mant_bits` mantissa bits, smallest normal exponent `emin`
  (exponent field 0 holds the subnormals k · 2^(emin − mant_bits)), largest magnitude `max`."""
  mant_bits: int
  emin: int
  max: float


# Block-scaled codecs and their magnitude grids (scaled so the grid max is `max`).
_GRIDS = {
    "fp8_e4m3": _Minifloat(mant_bits=3, emin=-6, max=448.0),  # float8_e4m3fn
    "fp4_e2m1": _Minifloat(mant_bits=1, emin=0, max=6.0),     # OCP FP4
    "fp4_e3m0": _Minifloat(mant_bits=0, emin=-6, max=1.0),    # SPEC §3: 2^(e-7), e=1..7
}


def _magnitude_table(fmt: _Minifloat) -> np.ndarray:
  """The 8 magnitudes of a 3-bit (exponent|mantissa) field, indexed by that field."""
  m = fmt.mant_bits
  out = []
  for c in range(8):
    exp_field, mant = c >> m, c & ((1 << m) - 1)
    if exp_field == 0:
      out.append(mant * 2.0 ** (fmt.emin - m))
    else:
      out.append((1 + mant / 2**m) * 2.0 ** (exp_field - 1 + fmt.emin))
  return np.asarray(out, np.float32)


class Encoded(NamedTuple):
  """What travels for one array.

  Attributes:
    payload: the values or codes: float32 [n] (fp32), bfloat16 [n] (bf16), float8_e4m3fn
      [n_pad] (fp8_e4m3), or uint8 [n_pad / 2] with two 4-bit codes per byte (fp4_*).
    scales: float32 [n_pad / block_size], one per block; float32 [0] for fp32 and bf16.
  """
  payload: jax.Array
  scales: jax.Array


# ----------------------------------------------------------------------------- packing


@jax.jit
def pack_nibbles(codes: jax.Array) -> jax.Array:
  """Packs 4-bit codes two per byte along the last axis: [..., 2k] -> uint8 [..., k].

  Byte j holds code 2j in its low nibble and code 2j+1 in its high nibble:
  byte = codes[2j] | codes[2j+1] << 4. An odd length is padded with one zero code.
  Values must be in 0..15 (higher bits are dropped).
  """
  codes = jnp.asarray(codes).astype(jnp.uint8) & 0xF
  if codes.shape[-1] % 2:
    codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
  pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


@functools.partial(jax.jit, static_argnames="n")
def unpack_nibbles(packed: jax.Array, n: int | None = None) -> jax.Array:
  """Inverse of `pack_nibbles`: uint8 [..., k] -> uint8 [..., 2k] codes in 0..15.

  Args:
    packed: bytes as produced by `pack_nibbles`.
    n: if given, keep only the first n codes (drops the pad code of an odd length).
  """
  packed = jnp.asarray(packed, jnp.uint8)
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
  codes = codes.reshape(*packed.shape[:-1], 2 * packed.shape[-1])
  return codes if n is None else codes[..., :n]


# ----------------------------------------------------------------------------- rounding


def _neighbours(y: jax.Array, fmt: _Minifloat) -> tuple[jax.Array, jax.Array]:
  """Grid magnitudes lo <= y <= hi around y in [0, fmt.max] (lo == hi == y on the grid)."""
  _, k = jnp.frexp(y)  # y = f · 2^k with f in [0.5, 1), so ⌊log2 y⌋ = k − 1 for normal y.
  # The explicit threshold (not frexp) decides the subnormal range, so flushed denormals or
  # y = 0 (frexp exponent 0) still get the subnormal step.
  e = jnp.where(y < 2.0**fmt.emin, fmt.emin, k - 1)
  step = jnp.ldexp(jnp.ones_like(y), e - fmt.mant_bits)
  lo = jnp.floor(y / step) * step  # exact: step is a power of two, y / step < 2^(m+1)
  hi = jnp.minimum(lo + step, fmt.max)
  return lo, hi


def _round(y: jax.Array, fmt: _Minifloat, u: jax.Array | None) -> jax.Array:
  """Rounds magnitudes y onto the grid: nearest with ties up (u None) or stochastically."""
  lo, hi = _neighbours(y, fmt)
  # Both differences are exact in float32 (lo <= y <= hi <= 2 max(lo, y) or lo = 0).
  d_lo, d_hi = y - lo, hi - y
  if u is None:
    up = d_hi <= d_lo  # tie -> hi: away from zero
  else:
    gap = hi - lo
    p = jnp.where(gap > 0, d_lo / jnp.where(gap > 0, gap, 1.0), 0.0)
    up = u < p
  return jnp.where(up, hi, lo)


def _code_of(q: jax.Array, fmt: _Minifloat) -> jax.Array:
  """The 3-bit (exponent|mantissa) field of a grid magnitude q, as uint8."""
  m = fmt.mant_bits
  _, k = jnp.frexp(q)
  sub = q < 2.0**fmt.emin
  sub_code = q / 2.0 ** (fmt.emin - m)  # 0 .. 2^m − 1
  e = k - 1
  mant = (jnp.ldexp(q, -e) - 1.0) * 2**m
  norm_code = (e - fmt.emin + 1) * 2**m + mant
  return jnp.where(sub, sub_code, norm_code).astype(jnp.uint8)


def _bf16_stochastic(x: jax.Array, rng: jax.Array) -> jax.Array:
  """Unbiased stochastic rounding of float32 to bfloat16 (finite inputs below the bf16 max)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(rng, x.shape, jnp.uint32) >> 16
  # Adding U{0..2^16−1} to the magnitude bits then truncating rounds the magnitude up with
  # probability (discarded bits) / 2^16; the sign bit is untouched.
  bits = (bits + noise) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(jnp.bfloat16)


# ----------------------------------------------------------------------------- the codec


@dataclasses.dataclass(frozen=True)
class Codec:
  """A quantizer for outer gradients. Static and hashable: close over it in jitted code.

  Attributes:
    name: one of `CODECS`.
    block_size: B, values per scale (32 is the MX convention); must be even for 4-bit codecs.
      Ignored by fp32 and bf16.
    stochastic: unbiased stochastic rounding instead of round-to-nearest; `encode` then needs
      an rng key (fp32 ignores the key).
  """
  name: str
  block_size: int = 32
  stochastic: bool = False

  def __post_init__(self):
    if self.name not in CODECS:
      raise ValueError(f"diloco.codec must be one of {CODECS}, got {self.name!r}")
    if (isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer))
        or self.block_size < 1):
      raise ValueError(f"diloco.codec_block_size must be an integer >= 1, got {self.block_size!r}")
    if self.bits == 4 and self.block_size % 2:
      raise ValueError(f"diloco.codec_block_size must be even for the 4-bit codec {self.name!r} "
                       f"(two codes per byte, blocks must not share a byte), got "
                       f"{self.block_size}")
    if not isinstance(self.stochastic, (bool, np.bool_)):
      raise ValueError(f"diloco.stochastic must be a bool, got {self.stochastic!r}")

  @property
  def bits(self) -> int:
    """Bits per value on the wire, excluding scales."""
    return _BITS[self.name]

  @property
  def scale_bits(self) -> int:
    """Bits of one block scale (float32), 0 for the unscaled fp32 and bf16."""
    return SCALE_BITS if self.name in _GRIDS else 0

  def num_blocks(self, n: int) -> int:
    """⌈n / B⌉ for the scaled codecs, 0 for fp32/bf16."""
    return -(-n // self.block_size) if self.name in _GRIDS else 0

  def wire_bits(self, n: int) -> int:
    """SPEC §3: n · bits + ⌈n / B⌉ · scale_bits. Equals 8 × (bytes of `encode`'s arrays) when
    B divides n; see `payload_bits` for the padded count."""
    return n * self.bits + self.num_blocks(n) * self.scale_bits

  def payload_bits(self, n: int) -> int:
    """8 × (payload.nbytes + scales.nbytes) of `encode` on n values, padding included."""
    if self.name not in _GRIDS:
      return n * self.bits
    nb = self.num_blocks(n)
    return nb * self.block_size * self.bits + nb * self.scale_bits

  def encode(self, x: jax.Array, rng: jax.Array | None = None) -> Encoded:
    """Quantizes x (any shape, cast to float32) into the wire arrays; see the module doc.

    Args:
      x: the values; flattened, then zero-padded to a multiple of block_size.
      rng: a PRNG key, required iff `stochastic` (ignored otherwise).
    """
    if self.stochastic and rng is None:
      raise ValueError(f"Codec({self.name!r}, stochastic=True).encode needs an rng key")
    return _encode(self, jnp.asarray(x), rng if self.stochastic else None)

  def decode(self, enc: Encoded, shape, dtype=jnp.float32) -> jax.Array:
    """Dequantizes `enc` back to an array of `shape` (padding dropped) and `dtype`."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    return _decode(self, enc, shape, jnp.dtype(dtype))

  def roundtrip(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """decode(encode(x)) in x's shape and (floating) dtype; fp32 returns x itself."""
    if self.name == "fp32":
      return x
    x = jnp.asarray(x)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return self.decode(self.encode(x, rng), x.shape, dtype)


# One compiled program per (codec, shape): fast when called eagerly, inlined when traced inside
# a caller's jit or vmap.


@functools.partial(jax.jit, static_argnums=0)
def _encode(codec: Codec, x: jax.Array, rng: jax.Array | None) -> Encoded:
  x = jnp.ravel(jnp.asarray(x)).astype(jnp.float32)
  empty = jnp.zeros((0,), SCALE_DTYPE)
  if codec.name == "fp32":
    return Encoded(x, empty)
  if codec.name == "bf16":
    payload = _bf16_stochastic(x, rng) if codec.stochastic else x.astype(jnp.bfloat16)
    return Encoded(payload, empty)

  fmt = _GRIDS[codec.name]
  n, b = x.shape[0], codec.block_size
  nb = codec.num_blocks(n)
  xb = jnp.pad(x, (0, nb * b - n)).reshape(nb, b)
  amax = jnp.max(jnp.abs(xb), axis=1)
  scales = (amax / fmt.max).astype(SCALE_DTYPE)
  safe = jnp.where(scales > 0, scales, 1.0)[:, None]
  # Division can land a hair above g_max for the block max; clip back onto the grid.
  y = jnp.minimum(jnp.abs(xb) / safe, fmt.max)
  u = jax.random.uniform(rng, y.shape, jnp.float32) if codec.stochastic else None
  q = _round(y, fmt, u)
  neg = xb < 0
  if codec.name == "fp8_e4m3":
    # q is on the e4m3fn grid, so this cast is exact (no second rounding).
    payload = jnp.where(neg & (q > 0), -q, q).astype(jnp.float8_e4m3fn).reshape(-1)
  else:
    codes = _code_of(q, fmt) | jnp.where(neg & (q > 0), jnp.uint8(8), jnp.uint8(0))
    payload = pack_nibbles(codes.reshape(-1))
  return Encoded(payload, scales)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _decode(codec: Codec, enc: Encoded, shape: tuple[int, ...], dtype) -> jax.Array:
  n = math.prod(shape)
  if codec.name in ("fp32", "bf16"):
    return enc.payload.astype(jnp.float32)[:n].reshape(shape).astype(dtype)
  nb, b = enc.scales.shape[0], codec.block_size
  if codec.name == "fp8_e4m3":
    g = enc.payload.astype(jnp.float32)
  else:
    codes = unpack_nibbles(enc.payload)
    table = jnp.asarray(_magnitude_table(_GRIDS[codec.name]))
    mag = table[(codes & 7).astype(jnp.int32)]
    g = jnp.where((codes & 8) != 0, -mag, mag)
  x = g.reshape(nb, b) * enc.scales.astype(jnp.float32)[:, None]
  return x.reshape(-1)[:n].reshape(shape).astype(dtype)


def get_codec(name: str, block_size: int = 32, stochastic: bool = False) -> Codec:
  """The codec for a config value (`diloco.codec`); raises ValueError on bad values."""
  return Codec(name=name, block_size=block_size, stochastic=stochastic)


def relative_error(x: jax.Array, y: jax.Array) -> jax.Array:
  """‖x − y‖₂ / max(‖x‖₂, tiny), in float32 over all elements (0 when x = y = 0)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  return jnp.linalg.norm((x - y).ravel()) / jnp.maximum(
      jnp.linalg.norm(x.ravel()), jnp.finfo(jnp.float32).tiny)
