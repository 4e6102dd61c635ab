"""The Triton FP8 GEMM (kernels/fp8/triton_gemm.py): the plain GEMM against the reference, the
quantising epilogue against the unfused GEMM + delayed quantiser (bit for bit), its fallbacks, and
(gpu) both at real shapes against cuBLAS and fp32.

CPU tests run the kernel in Triton's interpreter with 32 x 32 x 32 tiles and 3 persistent programs,
on shapes with partial tiles in every dimension (TMA pads loads with zeros and clips stores).
Tolerance of the plain GEMM against the reference (same FP8 operands, fp32 accumulation in another
order): fp32 output 1e-5 relative; bf16 output within one bf16 rounding of the reference's.
"""

import pytest
import torch

from kernels.fp8 import triton_gemm as TG
from kernels.fp8.amax_history import AmaxHistory
from kernels.fp8.gemm import fp8_gemm
from kernels.fp8.quantize import quantize_rows, quantize_rows_and_columns
from kernels.fp8.reference import dequantize, fp8_gemm_reference, quantize_rows_reference
from tests.kernels.fp8_asserts import assert_fp8_data_match
from tests.kernels.kernel_testing import FP32_TOL, rel_err

# M, K, N: a partial tile along each dimension, 3 x 3 output tiles over 3 programs
SHAPES = [(80, 176, 96), (96, 160, 80)]


def operands(M, K, N, device="cpu", seed=0, gain=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = (torch.randn(M, K, generator=g) * gain).to(device, torch.bfloat16)
    b = (torch.randn(N, K, generator=g) * K ** -0.5).to(device, torch.bfloat16)
    if device == "cpu":
        return quantize_rows_reference(a, "tensor"), quantize_rows_reference(b, "tensor")
    return quantize_rows(a, "tensor"), quantize_rows(b, "tensor")


@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemm_matches_the_reference(M, K, N, fast_accum, small_gemm_tiles):
    qa, qb = operands(M, K, N, seed=M)
    ref = fp8_gemm_reference(qa, qb, torch.float32)
    out32 = TG.fp8_gemm_triton(qa, qb, torch.float32, use_fast_accum=fast_accum)
    assert out32.shape == (M, N) and rel_err(out32, ref) < FP32_TOL
    out16 = TG.fp8_gemm_triton(qa, qb, torch.bfloat16, use_fast_accum=fast_accum)
    assert out16.dtype == torch.bfloat16
    # within one bf16 rounding step (2^-8 relative) of the reference, element by element
    assert ((out16.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()


def unfused(qa, qb, history):
    """What the quantising epilogue replaces: the bf16 product, then the delayed quantiser."""
    return quantize_rows_and_columns(TG.fp8_gemm_triton(qa, qb), "tensor", history)


def assert_same_fp8(x, y, what):
    assert_fp8_data_match(x.data, y.data, what)
    assert torch.equal(x.scale, y.scale), what


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_quantizing_epilogue_equals_the_gemm_then_the_delayed_quantiser(M, K, N, small_gemm_tiles):
    """Six steps of one site with a history of 2 amaxes: the bootstrap step, steady steps, an 8x
    jump (saturating under the old scale), and the window rolling past it. Rows, columns, scales
    and recorded amaxes all equal the unfused path's."""
    fused, ref = AmaxHistory(2), AmaxHistory(2)
    for step, gain in enumerate([1.0, 1.0, 8.0, 1.0, 1.0, 1.0]):
        qa, qb = operands(M, K, N, seed=step, gain=gain)
        rows, cols = TG.fp8_gemm_quantized(qa, qb, fused)
        want_rows, want_cols = unfused(qa, qb, ref)
        assert rows.data.shape == (M, N) and cols.data.shape == (N, M)
        assert_same_fp8(rows, want_rows, f"rows, step {step}")
        assert_same_fp8(cols, want_cols, f"columns, step {step}")
        assert torch.equal(fused.amaxes, ref.amaxes), step
        saturated = rows.data.float().abs().eq(448).float().mean().item()
        assert (saturated > 0.01) == (step == 2), (step, saturated)
    assert fused.recorded == 6


def test_quantizing_epilogue_emits_only_the_forms_asked_for(small_gemm_tiles):
    qa, qb = operands(96, 160, 80)
    history = AmaxHistory()
    TG.fp8_gemm_quantized(qa, qb, history)  # bootstrap
    rows, cols = TG.fp8_gemm_quantized(qa, qb, history, columns=False)
    assert cols is None and rows.data.shape == (96, 80)
    rows2, cols2 = TG.fp8_gemm_quantized(qa, qb, history, rows=False)
    assert rows2 is None and torch.equal(cols2.data.float(), rows.data.float().t())
    with pytest.raises(ValueError, match="rows, columns or both"):
        TG.fp8_gemm_quantized(qa, qb, history, rows=False, columns=False)


def test_shapes_the_kernel_does_not_take_run_the_unfused_path(small_gemm_tiles):
    """M = 90 is no multiple of 16 (TMA strides): fp8_gemm (cuBLAS on CUDA) and the quantiser."""
    qa, qb = operands(90, 160, 80)
    h1, h2 = AmaxHistory(), AmaxHistory()
    for _ in range(2):
        rows, cols = TG.fp8_gemm_quantized(qa, qb, h1)
        want = quantize_rows_and_columns(fp8_gemm(qa, qb), "tensor", h2)
        assert_same_fp8(rows, want[0], "rows")
        assert_same_fp8(cols, want[1], "columns")
    assert torch.equal(TG.fp8_gemm_triton(qa, qb, torch.float32), fp8_gemm(qa, qb, torch.float32))


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    qa, qb = operands(96, 160, 80)
    assert torch.equal(TG.fp8_gemm_triton(qa, qb), fp8_gemm_reference(qa, qb))
    history = AmaxHistory()
    TG.fp8_gemm_quantized(qa, qb, history)
    rows, _ = TG.fp8_gemm_quantized(qa, qb, history)
    assert rel_err(dequantize(rows), fp8_gemm_reference(qa, qb, torch.float32)) < 0.03


def test_rejects_other_scalings_and_shapes():
    qa, qb = operands(96, 160, 80)
    blocked = quantize_rows_reference(torch.randn(80, 160), "block1x128")
    with pytest.raises(ValueError, match="tensor-scaled operands"):
        TG.fp8_gemm_triton(qa, blocked)
    with pytest.raises(ValueError, match=r"a \[M, K\] @ b\[N, K\]\^T"):
        TG.fp8_gemm_triton(qa, operands(96, 128, 80)[1])
    with pytest.raises(ValueError, match="out_dtype"):
        TG.fp8_gemm_triton(qa, qb, torch.int8)


# --------------------------------------------------------------------------------------------
# GPU: real shapes, default tiles.

GPU_SHAPES = [(4096, 2048, 6144), (4000, 2048, 1536), (16384, 4096, 16384)]


def exact_product(qa, qb):
    return dequantize(qa).double() @ dequantize(qb).double().t()


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_gpu_gemm_is_as_accurate_as_cublas(M, K, N):
    """fp32 outputs against the fp64 product of the same FP8 operands, in each accumulation mode
    no less accurate than cuBLAS's (x1.1): the FP8 MMA's own sums limit both (measured on the H100:
    1.3e-4 precise, 8e-4 to 1.3e-3 fast, equal to cuBLAS's to all digits)."""
    qa, qb = operands(M, K, N, device="cuda", seed=M)
    exact = exact_product(qa, qb)
    err = {(who, fast): rel_err(gemm(qa, qb, torch.float32, use_fast_accum=fast), exact)
           for who, gemm in (("ours", TG.fp8_gemm_triton), ("cuBLAS", fp8_gemm))
           for fast in (False, True)}
    print(f"M,K,N={M},{K},{N} rel err: {err}")
    for fast, bound in ((False, 1e-3), (True, 1e-2)):
        assert err["ours", fast] < bound and err["ours", fast] <= 1.1 * err["cuBLAS", fast], err


@pytest.mark.gpu
def test_gpu_fast_accumulation_hardly_changes_the_quantised_product():
    """The quantising epilogue's output is rounded to e4m3 (~2.6% RMS), which swamps fast
    accumulation's error: at K = 4096 the dequantised FP8 product is within 2% (relative) as far
    from the exact product with fast accumulation as with precise (linear_pair relies on it)."""
    qa, qb = operands(16384, 4096, 16384, device="cuda", seed=7)
    exact = exact_product(qa, qb)
    err = {}
    for fast in (False, True):
        history = AmaxHistory()
        TG.fp8_gemm_quantized(qa, qb, history)  # bootstrap: both take the scale of this amax
        rows, _ = TG.fp8_gemm_quantized(qa, qb, history, use_fast_accum=fast, columns=False)
        err[fast] = rel_err(dequantize(rows), exact)
    print(f"quantised product rel err: precise {err[False]:.5f}, fast {err[True]:.5f}")
    assert err[True] <= 1.02 * err[False], err


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_gpu_quantizing_epilogue_equals_the_unfused_path(M, K, N):
    fused, ref = AmaxHistory(), AmaxHistory()
    for step, gain in enumerate([1.0, 1.0, 4.0]):
        qa, qb = operands(M, K, N, device="cuda", seed=step, gain=gain)
        rows, cols = TG.fp8_gemm_quantized(qa, qb, fused)
        want_rows, want_cols = unfused(qa, qb, ref)
        assert_same_fp8(rows, want_rows, f"rows, step {step}")
        assert_same_fp8(cols, want_cols, f"columns, step {step}")
        assert torch.equal(fused.amaxes, ref.amaxes), step
