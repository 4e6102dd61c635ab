"""FP8 grouped quantisers and GEMMs (kernels/fp8/grouped.py) against their references.

The Triton quantisers equal the references bit for bit (data bytes and scales), with every output
allocated NaN-filled so that an element a kernel fails to write fails the test. The group-columns
form is compared over the whole padded token axis, padding zeros included. The torch GEMM path is
checked for its calling convention on meta tensors here, and against the emulation in the `gpu`
tests (Ring-mini shapes: 65536 rows over 256 and 32 experts, d = 2048, F = 512).
"""

import pathlib
import subprocess
import sys

import pytest
import torch

from kernels.fp8 import grouped as G
from kernels.fp8 import grouped_reference as R
from kernels.fp8.tensor import FP8_DTYPE, Fp8Tensor
from tests.kernels.fp8_asserts import assert_fp8_data_match, poisoned_allocations
from tests.kernels.kernel_testing import DEVICE

# Group sizes: empty experts, sizes that are not multiples of 16, one larger than a row tile.
COUNTS = [13, 0, 70, 1, 0, 33]


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str = ""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if a.dtype == FP8_DTYPE:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    diff = (a != b) if a.dtype == torch.uint8 else ~((a == b) | (a.isnan() & b.isnan()))
    assert not diff.any(), f"{what}: {int(diff.sum())} of {diff.numel()} elements differ"
    assert not (b.dtype != torch.uint8 and b.isnan().any()), f"{what}: NaN in the reference"


def assert_same_fp8(t: Fp8Tensor, ref: Fp8Tensor, what: str = ""):
    assert t.scaling == ref.scaling == "row"
    assert_fp8_data_match(t.data, ref.data, what + " data")
    assert_bitwise(t.scale, ref.scale, what + " scale")


def assert_same_columns(got: R.GroupColumns, ref: R.GroupColumns, what: str = ""):
    """Equal over the used part of the padded token axis (padding zeros included)."""
    n = int(ref.padded_offsets[-1])
    assert torch.equal(got.padded_offsets, ref.padded_offsets)
    assert_bitwise(got.data[:, :n], ref.data[:, :n], what + " data")
    assert_bitwise(got.scale, ref.scale, what + " scale")


def counts_tensor(counts, device=DEVICE):
    return torch.tensor(counts, dtype=torch.int64, device=device)


def offsets(counts, device=DEVICE):
    c = counts_tensor(counts, device)
    return R.group_offsets(c, c.device), R.padded_group_offsets(c, c.device)


def randn(*shape, dtype=torch.bfloat16, seed=0, scale=1.0, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


# -- quantisers (interpreter on CPU) ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(117, 96), (1, 48), (16, 640)])
def test_rows_quantiser_equals_reference(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    x[0, :5] = 0.0  # a zero row part; an all-zero row below
    if shape[0] > 2:
        x[2] = 0.0
    with poisoned_allocations():
        got = G.quantize_rows(x)
    assert got.scale.shape == (shape[0], 1)
    assert_same_fp8(got, R.quantize_rows_reference(x), "rows")


@pytest.mark.parametrize("transpose", [False, True])
def test_expert_weight_quantiser_equals_reference_without_a_transposed_copy(transpose):
    w = randn(3, 40, 72, scale=0.02, seed=1)
    with poisoned_allocations():
        got = G.quantize_expert_weight(w, transpose)
    ref = R.quantize_expert_weight_reference(w, transpose)
    assert got.data.shape == ((3 * 72, 40) if transpose else (3 * 40, 72))
    assert_same_fp8(got, ref, f"weight transpose={transpose}")


def test_padded_offsets_round_groups_up_to_16_and_give_empty_experts_16_zero_columns():
    offs, poffs = offsets([13, 0, 32, 1, 17])
    assert offs.tolist() == [13, 13, 45, 46, 63]
    assert poffs.tolist() == [16, 32, 64, 80, 112]
    assert poffs.dtype == offs.dtype == torch.int32
    assert R.padded_capacity(63, 5) >= 112


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_group_columns_quantiser_equals_reference_including_padding(dtype):
    T, C = sum(COUNTS), 80  # C: a partial column tile
    x = randn(T, C, dtype=dtype, scale=2.0, seed=2)
    x[20:30] *= 100.0  # an outlier block: scales are per expert, not per tensor
    offs, poffs = offsets(COUNTS)
    with poisoned_allocations():
        got = G.quantize_group_columns(x, offs, poffs)
    assert got.data.shape == (C, R.padded_capacity(T, len(COUNTS)))
    assert_same_columns(got, R.quantize_group_columns_reference(x, COUNTS), "columns")


def test_swiglu_quantisers_equal_quantised_reference_swiglu():
    T, F = sum(COUNTS), 48
    h = randn(T, 2 * F, scale=2.0, seed=3)
    probs = torch.rand(T, generator=torch.Generator(device=DEVICE).manual_seed(4), device=DEVICE)
    a = R.swiglu_reference(h, probs)
    offs, poffs = offsets(COUNTS)
    with poisoned_allocations():
        rows = G.quantize_swiglu_rows(h, probs)
        cols = G.quantize_swiglu_columns(h, probs, offs, poffs)
    assert_same_fp8(rows, R.quantize_rows_reference(a), "swiglu rows")
    assert_same_columns(cols, R.quantize_group_columns_reference(a, COUNTS), "swiglu columns")


def test_quantised_values_are_within_the_e4m3_bound():
    x = randn(64, 96, dtype=torch.float32, scale=5.0, seed=5)
    q = G.quantize_rows(x)
    deq = q.data.float() * q.scale
    assert ((deq - x).abs() <= 2 ** -4 * x.abs() + 2 ** -10 * q.scale + 1e-6 * x.abs()).all()


# -- GEMMs ----------------------------------------------------------------------------------------

def test_emulated_grouped_gemms_equal_per_expert_dequantised_products():
    E, N, K, M = len(COUNTS), 24, 40, 20
    T = sum(COUNTS)
    offs, poffs = offsets(COUNTS)
    a = G.quantize_rows(randn(T, K, seed=6))
    w = G.quantize_expert_weight(randn(E, N, K, seed=7))
    y = G.grouped_mm(a, w, offs, torch.float32)
    ad = a.data.float() * a.scale
    wd = (w.data.float() * w.scale).view(E, N, K)
    start = 0
    for e, n in enumerate(COUNTS):
        torch.testing.assert_close(y[start:start + n], ad[start:start + n] @ wd[e].t())
        start += n
    xa, xb = randn(T, M, seed=8), randn(T, N, seed=9)
    ca = G.quantize_group_columns(xa, offs, poffs)
    cb = G.quantize_group_columns(xb, offs, poffs)
    dw = G.grouped_wgrad(ca, cb, torch.float32)
    start = 0
    for e, n in enumerate(COUNTS):
        qa = R.quantize_group_columns_reference(xa[start:start + n], [n])
        qb = R.quantize_group_columns_reference(xb[start:start + n], [n])
        expect = ((qa.data[:, :n].float() * qa.scale[0][:, None])
                  @ (qb.data[:, :n].float() * qb.scale[0][:, None]).t())
        torch.testing.assert_close(dw[e], expect)
        if n == 0:
            assert (dw[e] == 0).all()
        start += n


def test_torch_scaled_grouped_mm_accepts_our_operands_on_meta_tensors():
    """The argument order, operand layouts and scale shapes of both torch calls pass torch's own
    checks (its meta functions implement those of the CUDA kernel)."""
    E, T, K, N, M = 4, 64, 32, 48, 16
    meta = dict(device="meta")
    a = Fp8Tensor(torch.empty(T, K, dtype=FP8_DTYPE, **meta), torch.empty(T, 1, **meta), "row")
    w = Fp8Tensor(torch.empty(E * N, K, dtype=FP8_DTYPE, **meta),
                  torch.empty(E * N, 1, **meta), "row")
    offs = torch.empty(E, dtype=torch.int32, **meta)
    cap = R.padded_capacity(T, E)
    ca = R.GroupColumns(torch.empty(M, cap, dtype=FP8_DTYPE, **meta), torch.empty(E, M, **meta),
                        offs)
    cb = R.GroupColumns(torch.empty(N, cap, dtype=FP8_DTYPE, **meta), torch.empty(E, N, **meta),
                        offs)
    with G.use_backend("torch"):
        assert G.grouped_mm(a, w, offs).shape == (T, N)
        assert G.grouped_wgrad(ca, cb).shape == (E, M, N)


def test_torch_backend_refuses_cpu_tensors():
    a = G.quantize_rows(randn(16, 32, device="cpu"))
    w = G.quantize_expert_weight(randn(1, 16, 32, device="cpu"))
    with G.use_backend("torch"), pytest.raises(RuntimeError, match="needs CUDA"):
        G.grouped_mm(a, w, torch.tensor([16], dtype=torch.int32))


# -- GPU: real shapes, the torch path against the emulation ------------------------------------

def ring_mini_counts(T, E, seed, align=16):
    """Balanced-ish random group sizes (multiples of `align`), summing to T, two experts empty."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(E, generator=g) + 0.5
    weights[[1, E // 2]] = 0.0
    units = T // align
    c = torch.floor(weights / weights.sum() * units).long()
    c[0] += units - int(c.sum())
    return (c * align).tolist()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def ring_mini(E):
    """(T, d, F, counts, offs, poffs, x) at Ring-mini shapes over E experts."""
    T, d, F = 65536, 2048, 512
    counts = ring_mini_counts(T, E, seed=E)
    return (T, d, F, counts, *offsets(counts), randn(T, d, seed=1))


@pytest.mark.gpu
@pytest.mark.parametrize("E", [256, 32])
def test_gpu_quantisers_equal_reference_at_ring_mini_shapes(E):
    T, d, F, counts, offs, poffs, x = ring_mini(E)
    assert_same_fp8(G.quantize_rows(x), R.quantize_rows_reference(x), "rows")
    w1 = randn(E, 2 * F, d, scale=0.02, seed=2)
    for tr in (False, True):
        assert_same_fp8(G.quantize_expert_weight(w1, tr),
                        R.quantize_expert_weight_reference(w1, tr), f"w1 transpose={tr}")
    assert_same_columns(G.quantize_group_columns(x, offs, poffs),
                        R.quantize_group_columns_reference(x, counts), "columns")
    # Fused SwiGLU: the GPU's sigmoid may differ from torch's in the last fp32 bit, which can move
    # a bf16 rounding: allow a few e4m3 values one step apart.
    h = randn(T, 2 * F, scale=2.0, seed=3)
    probs = torch.rand(T, device=DEVICE)
    a = R.swiglu_reference(h, probs)
    rows, rref = G.quantize_swiglu_rows(h, probs), R.quantize_rows_reference(a)
    assert (rows.data.view(torch.uint8) != rref.data.view(torch.uint8)).float().mean() < 1e-3
    assert rel(rows.data.float() * rows.scale, rref.data.float() * rref.scale) < 1e-3
    cols = G.quantize_swiglu_columns(h, probs, offs, poffs)
    cref = R.quantize_group_columns_reference(a, counts)
    n = int(poffs[-1])
    assert rel(cols.data[:, :n].float(), cref.data[:, :n].float()) < 1e-3
    torch.testing.assert_close(cols.scale, cref.scale, rtol=1e-2, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("E", [256, 32])
def test_gpu_scaled_grouped_mm_matches_emulation_at_ring_mini_shapes(E):
    T, d, F, counts, offs, poffs, x = ring_mini(E)
    w1 = randn(E, 2 * F, d, scale=0.02, seed=3)
    xr, w1r = G.quantize_rows(x), G.quantize_expert_weight(w1)
    with G.use_backend("emulated"):
        h_ref = G.grouped_mm(xr, w1r, offs)
    h = G.grouped_mm(xr, w1r, offs)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()
    assert rel(h, h_ref) < 5e-3
    # dgrad: dy @ w1[e] with the transposed weight form.
    dyr, w1t = G.quantize_rows(h), G.quantize_expert_weight(w1, transpose=True)
    with G.use_backend("emulated"):
        dx_ref = G.grouped_mm(dyr, w1t, offs)
    assert rel(G.grouped_mm(dyr, w1t, offs), dx_ref) < 5e-3
    # wgrad over padded token groups; the empty experts' gradients are exactly zero.
    hc, xc = G.quantize_group_columns(h, offs, poffs), G.quantize_group_columns(x, offs, poffs)
    dw = G.grouped_wgrad(hc, xc)
    dw_ref = R.grouped_wgrad_reference(hc, xc)
    assert dw.shape == (E, 2 * F, d)
    assert rel(dw, dw_ref) < 5e-3
    empty = [e for e, n in enumerate(counts) if n == 0]
    assert empty and (dw[empty] == 0).all()


_UNALIGNED_SCRIPT = r"""
import torch
from kernels.fp8 import grouped as G, grouped_reference as R
counts = [13, 0, 70, 1, 0, 33] * 40
c = torch.tensor(counts, device="cuda")
offs, poffs = R.group_offsets(c, c.device), R.padded_group_offsets(c, c.device)
T, E, K, N = sum(counts), len(counts), 256, 128
x = torch.randn(T, K, device="cuda").bfloat16()
w = (torch.randn(E, N, K, device="cuda") * 0.05).bfloat16()
xr, wr = G.quantize_rows(x), G.quantize_expert_weight(w)
y = G.grouped_mm(xr, wr, offs)
torch.cuda.synchronize()
with G.use_backend("emulated"):
    y_ref = G.grouped_mm(xr, wr, offs)
err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
xc = G.quantize_group_columns(x, offs, poffs)
dw = G.grouped_wgrad(xc, xc)
torch.cuda.synchronize()
print("ERR", err, bool((dw[[1, 4]] == 0).all()))
"""


@pytest.mark.gpu
def test_gpu_groups_not_multiple_of_16_run_in_a_subprocess():
    """Row groups of any size (2-D x 3-D: torch checks alignment only along a dynamic K or N) and
    the padded wgrad. In a subprocess: a device-side assert would poison this process's CUDA
    context for every later test."""
    run = subprocess.run([sys.executable, "-c", _UNALIGNED_SCRIPT], capture_output=True,
                         text=True, timeout=300, cwd=pathlib.Path(__file__).resolve().parents[2])
    assert run.returncode == 0, run.stderr[-3000:]
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("ERR")][-1].split()
    assert float(line[1]) < 5e-3 and line[2] == "True", line
