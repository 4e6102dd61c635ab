"""Triton jit helpers the kernel packages share: the FP8 group scale and e4m3 cast (with the
numerics of tensor.py / reference.py: the tests compare bit for bit) and rounding to the
activation dtype.

  fp8_scale(amax)                    max(amax, AMAX_FLOOR) / 448, correctly rounded
  fp8_inverse(s)                     1 / s, IEEE-rounded (once per group, not per element)
  fp8_cast(x, inv_s, EXACT_ROUND)    e4m3(clamp(x * inv_s, -448, 448)), round to nearest even
  history_scale(amaxes, n, slot, S)  the delayed tensor scale: fp8_scale of the largest of n
                                     history amaxes leaving out `slot` (amax_history.py)
  bf16_rne(x)                        fp32 x rounded to nearest-even bf16 by bit arithmetic (fp32)
  round_to_code(x, ROUND, EXACT)     fp32 x rounded to the dtype of ROUND code (ROUND_CODES in
                                     kernels/triton_support.py) and back to fp32

EXACT_ROUND / EXACT (constexpr; pass `interpreting()`): Triton's CPU interpreter (3.9) converts
fp32 to bf16 by truncation and fp32 to e4m3 wrongly (a mantissa that rounds up does not carry into
the exponent: 31.8 -> 16), but converts exactly representable values exactly. Under it, values
are first rounded to nearest even in fp32 integer/bit arithmetic, so that CPU tests see the GPU's
numerics; on a GPU the hardware conversions (cvt.rn[.satfinite]) run. (The interpreter may also
drop the sign of a zero: compare FP8 data as values.)
"""

import triton
import triton.language as tl

from .tensor import AMAX_FLOOR, FP8_MAX

_FLOOR = tl.constexpr(AMAX_FLOOR)
_FMAX = tl.constexpr(FP8_MAX)


@triton.jit
def fp8_scale(amax):
    """Decoding scale(s) of groups with absolute maximum amax (fp32, any shape)."""
    # Triton's `/` is approximate on GPUs; div_rn rounds correctly (reference.scale_from_amax
    # too). Both operands have amax's shape (m is finite, so m * 0 + 448 == 448).
    m = tl.maximum(amax, _FLOOR)
    return tl.math.div_rn(m, m * 0.0 + _FMAX)


@triton.jit
def fp8_inverse(scale):
    """1 / scale (fp32, any shape), rounded as torch's reciprocal. The cast multiplies by it: an
    IEEE division per element (div_rn) halved the quantisers' bandwidth on the H100."""
    return tl.math.div_rn(scale * 0.0 + 1.0, scale)


@triton.jit
def history_scale(amax_ptr, n_amax, slot, AMAX_SLOTS: tl.constexpr):
    """fp8_scale of max(amax_ptr[i] for i < n_amax, i != slot); AMAX_SLOTS: a power of two
    >= n_amax. slot -1 leaves nothing out."""
    i = tl.arange(0, AMAX_SLOTS)
    amaxes = tl.load(amax_ptr + i, mask=(i < n_amax) & (i != slot), other=0.0)
    return fp8_scale(tl.max(amaxes, axis=0))


@triton.jit
def e4m3_grid(q):
    """q (fp32, |q| <= 448) rounded onto the e4m3 grid, ties to even, in fp32: magic-number
    rounding with the grid step 2^(max(e, -6) - 3) (3 mantissa bits, smallest normal exponent -6,
    subnormal step 2^-9). Values that round to zero keep their sign."""
    e = tl.maximum(((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3
    magic = ((e + 127) << 23).to(tl.float32, bitcast=True) * 12582912.0  # 1.5 * 2^23 * step
    r = (q + magic) - magic
    return tl.where(r == 0.0, q * 0.0, r)


@triton.jit
def fp8_cast(x, inv_scale, EXACT_ROUND: tl.constexpr):
    """e4m3 of clamp(x * inv_scale); x fp32, inv_scale fp32 (fp8_inverse of the scales),
    broadcastable to x."""
    q = x * inv_scale
    q = tl.minimum(tl.maximum(q, -_FMAX), _FMAX)
    if EXACT_ROUND:
        q = e4m3_grid(q)
    return q.to(tl.float8e4nv)  # fp32 -> fp8 downcasts round to nearest even by default


@triton.jit
def bf16_rne(x):
    """fp32 x rounded to nearest-even bf16, as fp32 (exact on any backend)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to_code(x, ROUND: tl.constexpr, EXACT: tl.constexpr):
    """fp32 x rounded to nearest-even in the dtype of ROUND (0 fp32: unchanged, 1 bf16, 2 fp16)
    and back to fp32: what an op in that dtype returns. bf16 by bit arithmetic when EXACT."""
    if ROUND == 1:
        if EXACT:
            x = bf16_rne(x)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x
