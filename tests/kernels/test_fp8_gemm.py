"""fp8_gemm: the reference against fp32, the CUDA dispatch's operand preparation (padding, scale
layouts) on CPU, and (gpu) the native GEMMs against the reference at real shapes.

Tolerance of FP8 against fp32 (random normal operands): rounding to e4m3 (3 mantissa bits,
nearest even) leaves a relative error uniform within half a step, RMS 2^-3/sqrt(12) *
sqrt(E[1/(1+f)^2]) = 0.0361 * 0.735 = 0.0265 per operand for log-uniform mantissas f; the two
operands' errors add in quadrature in a long dot product: 0.0375 relative (Frobenius) error of the
output. Measured 0.036-0.038 for every recipe; the tests allow FP8_TOL = 0.042.
The native GEMMs read the same FP8 operands as the reference, so they differ from it only by
accumulation order and the output rounding (bf16: 2^-9): GPU_TOL = 1e-2.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.fp8 import gemm as G
from kernels.fp8.quantize import quantize_rows, quantize_weight
from kernels.fp8.reference import (dequantize, fp8_gemm_reference, quantize_rows_reference,
                                   quantize_weight_reference)
from tests.kernels.kernel_testing import rel_err

FP8_TOL = 0.042
GPU_TOL = 1e-2
PAIRS = list(G.GEMMS)


def operands(M, K, N, pair, device="cpu", seed=0, quantize=True):
    """Random normal a [M, K], b [N, K] and their FP8 forms for `pair` (reference quantisers on
    CPU, the Triton ones on CUDA)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    b = (torch.randn(N, K, generator=g) * 0.02).to(device, torch.bfloat16)
    if device == "cpu":
        qa, qb = quantize_rows_reference(a, pair[0]), quantize_rows_reference(b, pair[1])
    else:
        qa = quantize_rows(a, pair[0])
        qb = quantize_weight(b, pair[1]) if pair[1] == "block128x128" else quantize_rows(b, pair[1])
    return a, b, qa, qb


@pytest.mark.parametrize("pair", PAIRS)
def test_reference_gemm_is_within_fp8_rounding_of_fp32(pair):
    a, b, qa, qb = operands(256, 512, 192, pair)
    out = fp8_gemm_reference(qa, qb, torch.float32)
    err = rel_err(out, a.float() @ b.float().t())
    assert 0.03 < err < FP8_TOL, err  # the lower bound shows the rounding really happened
    assert torch.equal(G.fp8_gemm(qa, qb, torch.float32), out)  # CPU dispatch: the reference
    assert G.fp8_gemm(qa, qb).dtype == torch.bfloat16


def test_unsupported_pairs_and_shapes_raise():
    _, _, qa, _ = operands(32, 128, 32, ("block1x128", "block1x128"))
    _, _, _, qw = operands(32, 128, 32, ("tensor", "block128x128"))
    _, _, qt, _ = operands(32, 128, 32, ("tensor", "tensor"))
    with pytest.raises(ValueError, match="no FP8 GEMM"):
        G.fp8_gemm(qt, qw)
    with pytest.raises(ValueError, match="no FP8 GEMM"):
        G.fp8_gemm(qw, qa)
    _, _, qa2, _ = operands(32, 256, 32, ("block1x128", "block1x128"))
    with pytest.raises(ValueError, match="fp8_gemm computes"):
        G.fp8_gemm(qa, qa2)


@pytest.mark.parametrize("M,K,N", [(201, 272, 150), (128, 200, 144), (64, 256, 96)])
@pytest.mark.parametrize("pair", [("tensor", "tensor"), ("row", "row")])
def test_cuda_path_operands_with_cpu_scaled_mm(M, K, N, pair):
    """The CUDA branch (padding, scale shapes) run with CPU torch._scaled_mm."""
    _, _, qa, qb = operands(M, K, N, pair, seed=M)
    out = G._cuda_gemm(qa, qb, torch.float32, use_fast_accum=False)
    assert out.shape == (M, N) and out.is_contiguous()
    assert rel_err(out, fp8_gemm_reference(qa, qb, torch.float32)) < 1e-5


def fake_blockwise_scaled_mm(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, *,
                             output_dtype):
    """torch.nn.functional.scaled_mm's blockwise contract (aten ScaledBlas.cpp, v2 path) checked
    strictly, computed by dequantising with the scales as cuBLAS reads them."""
    st = F.ScalingType
    M, K = mat_a.shape
    N = mat_b.shape[1]
    kb, l4 = math.ceil(K / 128), math.ceil(math.ceil(K / 128) / 4) * 4
    assert mat_b.shape[0] == K and K % 16 == 0 and N % 16 == 0, (mat_a.shape, mat_b.shape)
    assert mat_a.stride() == (K, 1) and mat_b.stride() == (1, K), "row-major a, column-major b"
    assert recipe_a == st.BlockWise1x128
    assert scale_a.shape == (M, kb) and scale_a.stride(0) == 1
    assert scale_a.stride(1) == M or kb == 1, scale_a.stride()
    assert M % G.BLOCKWISE_M_ALIGN == 0, M
    a = mat_a.float() * scale_a.repeat_interleave(128, 1)[:, :K]
    if recipe_b == st.BlockWise1x128:
        assert scale_b.shape == (N, kb) and scale_b.stride(0) == 1
        assert scale_b.stride(1) == N or kb == 1, scale_b.stride()
        b = mat_b.float() * scale_b.repeat_interleave(128, 1)[:, :K].t()
    else:
        assert recipe_b == st.BlockWise128x128
        nbn = math.ceil(N / 128)
        assert scale_b.shape == (l4, nbn) and scale_b.stride(0) == 1, scale_b.shape
        assert scale_b.stride(1) == l4 or nbn == 1, scale_b.stride()
        expand = scale_b[:kb].repeat_interleave(128, 0).repeat_interleave(128, 1)[:K, :N]
        b = mat_b.float() * expand
    return (a @ b).to(output_dtype)


@pytest.mark.parametrize("M,K,N", [(201, 272, 150), (128, 200, 144), (256, 512, 256),
                                   (130, 144, 16)])
@pytest.mark.parametrize("pair", [("block1x128", "block128x128"), ("block1x128", "block1x128")])
def test_cuda_path_blockwise_operands_meet_torchs_contract(M, K, N, pair, monkeypatch):
    monkeypatch.setattr(G, "_blockwise_api", lambda: (fake_blockwise_scaled_mm, F.ScalingType))
    _, _, qa, qb = operands(M, K, N, pair, seed=K)
    out = G._cuda_gemm(qa, qb, torch.float32, use_fast_accum=False)
    assert out.shape == (M, N)
    assert rel_err(out, fp8_gemm_reference(qa, qb, torch.float32)) < 1e-5


def test_padding_keeps_values_and_block_counts():
    _, _, qa, _ = operands(201, 200, 16, ("block1x128", "block1x128"))
    p = G._pad(qa, 204, 208)
    assert p.data.shape == (204, 208) and p.scale.shape == (204, 2)
    assert p.scale.stride() == (1, 204)
    assert torch.equal(dequantize(p)[:201, :200], dequantize(qa))
    assert (dequantize(p)[201:] == 0).all() and (dequantize(p)[:, 200:] == 0).all()


# --------------------------------------------------------------------------------------------
# GPU: the native GEMMs against the reference.

GPU_SHAPES = [(4096, 2048, 1536), (4000, 2048, 1536), (4001, 2064, 1552), (4001, 2000, 1500),
              (16384, 4096, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
@pytest.mark.parametrize("pair", PAIRS)
def test_gpu_gemm_equals_the_reference(pair, M, K, N, out_dtype):
    a, b, qa, qb = operands(M, K, N, pair, device="cuda", seed=M + K)
    info = (f"{G.GEMMS[pair]} M,K,N={M},{K},{N} out {out_dtype}: a {G._describe(qa)}; "
            f"b {G._describe(qb)}")
    out = G.fp8_gemm(qa, qb, out_dtype)
    ref = fp8_gemm_reference(qa, qb, torch.float32)
    assert out.shape == (M, N) and out.dtype == out_dtype, info
    assert torch.isfinite(out).all(), info
    err = rel_err(out, ref)
    print(f"{info}: rel err vs reference {err:.2e}")
    assert err < GPU_TOL, f"{info}: {err}"
    assert rel_err(out, a.float() @ b.float().t()) < FP8_TOL, info


@pytest.mark.gpu
@pytest.mark.parametrize("pair", [("tensor", "tensor"), ("row", "row")])
def test_gpu_fast_accumulation_stays_close(pair):
    _, _, qa, qb = operands(4096, 2048, 1536, pair, device="cuda")
    out = G.fp8_gemm(qa, qb, torch.bfloat16, use_fast_accum=True)
    assert rel_err(out, fp8_gemm_reference(qa, qb, torch.float32)) < GPU_TOL
