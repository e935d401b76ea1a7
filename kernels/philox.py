"""Counter-based random numbers for the Triton kernels: Philox4x32-10 and its conversions.

Bit-for-bit the scheme of ``specdec.reference`` (the specification), so that the Triton, C++ and
reference backends draw the same number for the same (seed, offset, stream, position, index):

    key     = (seed & 0xFFFFFFFF, seed >> 32)                      # seed: int64 bit pattern
    counter = (index, (stream << 16) | position, offset & 0xFFFFFFFF, offset >> 32)
    bits    = first output word of Philox4x32-10(counter, key)

Written out here with uint32 arithmetic (``tl.umulhi`` for the high half of the 32x32 product)
rather than through ``tl.rand``, whose counter layout is Triton's own and may change.
All helpers are ``@triton.jit`` functions that work on scalars or blocks (they broadcast).
"""
import triton
import triton.language as tl

# Stream ids (must equal specdec.reference.STREAM_*).
STREAM_ACCEPT: tl.constexpr = tl.constexpr(0)  # acceptance test of draft i: position i, index 0
STREAM_RESAMPLE: tl.constexpr = tl.constexpr(1)  # residual / bonus token: index = vocabulary id
STREAM_SAMPLE: tl.constexpr = tl.constexpr(2)  # the sample op: position 0, index = vocabulary id
# block streams of the two-level race: same position as the token race, index = block number
STREAM_RESAMPLE_BLOCK: tl.constexpr = tl.constexpr(3)
STREAM_SAMPLE_BLOCK: tl.constexpr = tl.constexpr(4)
# block verification: "keep drafts 0..j", counter offset + j, index j
STREAM_ACCEPT_PREFIX: tl.constexpr = tl.constexpr(5)

# Philox4x32 constants (Salmon et al. 2011). Literals above 2**31 are typed uint32 by Triton.
_PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 scalars/blocks; returns the four output words (uint32)."""
    for _ in tl.static_range(10):
        # uint32 products and sums wrap by design: no overflow check even in debug mode
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = tl.mul(c0, _PHILOX_M0, sanitize_overflow=False)  # low half of the product
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = tl.mul(c2, _PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def philox_bits(seed, offset, stream: tl.constexpr, position, index):
    """32 random bits (uint32) for (seed, offset, stream, position, index).

    seed, offset: int64 scalars or blocks (any bit pattern); position, index: integer scalars or
    blocks (position keeps its low 16 bits, index its low 32 bits)."""
    seed = tl.cast(seed, tl.int64)
    offset = tl.cast(offset, tl.int64)
    # int64 -> uint32 truncates, so (x >> 32) keeps bits 32..63 whatever the sign of x.
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c2 = offset.to(tl.uint32)
    c3 = (offset >> 32).to(tl.uint32)
    c1 = ((tl.cast(position, tl.int32) & 0xFFFF) | (stream << 16)).to(tl.uint32)
    c0 = tl.cast(index, tl.int64).to(tl.uint32)
    # broadcast the counter words to a common shape before the rounds
    zero = c0 ^ c0
    r0, _, _, _ = philox4x32_10(c0, c1 ^ zero, c2 ^ zero, c3 ^ zero, k0 ^ zero, k1 ^ zero)
    return r0


@triton.jit
def uniform_open_closed(bits):
    """Uniform in (0, 1] as float32 from uint32 bits: ((bits >> 8) + 1) * 2**-24 (exact)."""
    return ((bits >> 8) + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def exponential(bits):
    """Exponential(1) as float32 from uint32 bits: -log(v), v = (2 * (bits >> 9) + 1) * 2**-24.

    v lies in the open interval (0, 1), so e > 0. Close to v = 1 the fast hardware log has an
    absolute error comparable to -log(v) itself; there -log(v) = -log1p(-w) with w = 1 - v (exact)
    comes from its series instead, so that e keeps its relative precision."""
    v = (2 * (bits >> 9) + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08
    w = 1.0 - v
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * 0.25)))
    return tl.where(w < 0.015625, series, -tl.log(v))
