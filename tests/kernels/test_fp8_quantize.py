"""Triton FP8 quantisers against the PyTorch reference, and the reference against its error bound.

Equality is exact: every e4m3 value equal (compared as values: Triton's interpreter drops the sign
of a zero, GPUs keep it) and every scale equal to 1e-6 relative, with the scale layout of
tensor.py. Outputs are allocated NaN-filled during kernel runs, so an element a kernel fails to
write fails the test. Without a GPU the kernels run in Triton's interpreter at small shapes; the
`gpu` tests repeat the comparison at real shapes.

Error bound of one quantised element (scale s = amax/448, q = x/s rounded to e4m3, nearest even):
e4m3 has 3 mantissa bits, so in the normal range (|q| >= 2^-6) the rounding error is at most half
a step, 2^-4 |q|; below it the step is the subnormal 2^-9, error <= 2^-10. Hence
    |x - deq(x)| <= 2^-4 |x| + 2^-10 s     (plus fp32 rounding of x/s and q*s, ~2^-23 |x|).
"""


import pytest
import torch

from kernels.fp8 import quantize as Q
from kernels.fp8 import reference as R
from kernels.fp8.tensor import AMAX_FLOOR, FP8_MAX, Fp8Tensor
from tests.kernels.fp8_asserts import assert_fp8_data_match, poisoned_allocations
from tests.kernels.kernel_testing import DEVICE

# M, K: partial blocks in both dims, a single row, exact blocks.
SHAPES = [(200, 272), (1, 16), (128, 128)]


def strides(t):
    """Strides of the dims that have more than one element (the others' are arbitrary)."""
    return tuple(st for n, st in zip(t.shape, t.stride()) if n > 1)


def assert_same(t: Fp8Tensor, ref: Fp8Tensor, what=""):
    info = (f"{what}: scaling {t.scaling}, data {tuple(t.data.shape)} vs {tuple(ref.data.shape)}, "
            f"scale {tuple(t.scale.shape)} {t.scale.stride()} vs {tuple(ref.scale.shape)} "
            f"{ref.scale.stride()}")
    assert t.scaling == ref.scaling and t.data.dtype == torch.float8_e4m3fn, info
    assert t.data.shape == ref.data.shape and t.data.is_contiguous(), info
    assert t.scale.shape == ref.scale.shape and strides(t.scale) == strides(ref.scale), info
    assert t.scale.dtype == torch.float32, info
    assert torch.isfinite(t.scale).all(), f"unwritten scale; {info}"
    assert torch.equal(t.scale, ref.scale), info
    assert_fp8_data_match(t.data, ref.data, info)


def make_x(M, K, dtype, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Column magnitudes spread over six decades, so groups differ in scale.
    x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, K)[torch.randperm(K, generator=g)]
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("M,K", SHAPES)
@pytest.mark.parametrize("scaling", Q.ACTIVATION_SCALINGS)
def test_rows_columns_and_both_equal_the_reference(M, K, scaling):
    x = make_x(M, K, torch.bfloat16)
    with poisoned_allocations():
        rows = Q.quantize_rows(x, scaling)
        cols = Q.quantize_columns(x, scaling)
        both_rows, both_cols = Q.quantize_rows_and_columns(x, scaling)
    ref_rows = R.quantize_rows_reference(x, scaling)
    ref_cols = R.quantize_columns_reference(x, scaling)
    assert ref_cols.data.shape == (K, M)
    assert_same(rows, ref_rows, "rows")
    assert_same(cols, ref_cols, "columns")
    assert_same(both_rows, ref_rows, "rows of rows_and_columns")
    assert_same(both_cols, ref_cols, "columns of rows_and_columns")


@pytest.mark.parametrize("scaling", Q.ACTIVATION_SCALINGS)
def test_quantize_forms_gives_exactly_the_forms_asked_for(scaling):
    x = make_x(96, 256, torch.bfloat16)
    ref_rows = R.quantize_rows_reference(x, scaling)
    ref_cols = R.quantize_columns_reference(x, scaling)
    for rows, cols in ((True, False), (False, True), (True, True)):
        got_rows, got_cols = Q.quantize_forms(x, scaling, rows, cols)
        assert (got_rows is not None, got_cols is not None) == (rows, cols)
        if rows:
            assert_same(got_rows, ref_rows, "rows")
        if cols:
            assert_same(got_cols, ref_cols, "columns")
    with pytest.raises(ValueError, match="rows, columns or both"):
        Q.quantize_forms(x, scaling, False, False)


@pytest.mark.parametrize("scaling", Q.ACTIVATION_SCALINGS)
def test_fp32_and_strided_inputs_equal_the_reference(scaling):
    base = make_x(160, 300, torch.float32, seed=1)
    x = base[:, 10:282]  # row stride 300, K = 272
    with poisoned_allocations():
        rows, cols = Q.quantize_rows_and_columns(x, scaling)
    assert_same(rows, R.quantize_rows_reference(x, scaling), "rows")
    assert_same(cols, R.quantize_columns_reference(x, scaling), "columns")


@pytest.mark.parametrize("M,K", [(200, 272), (128, 256)])
@pytest.mark.parametrize("scaling", Q.WEIGHT_SCALINGS)
def test_weight_and_its_transpose_equal_the_reference(M, K, scaling):
    w = make_x(M, K, torch.bfloat16, seed=2)
    with poisoned_allocations():
        q = Q.quantize_weight(w, scaling)
        q2, qt = Q.quantize_weight_and_transpose(w, scaling)
    ref = R.quantize_weight_reference(w, scaling)
    assert_same(q, ref, "weight")
    assert_same(q2, ref, "weight of weight_and_transpose")
    # The dgrad operand of w^T: the exact transpose where scaling allows, else the re-quantised
    # columns of w; both are the reference's columns form.
    assert_same(qt, R.quantize_columns_reference(w, scaling), "transposed")
    if scaling != "row":
        assert_same(Q.transpose_fp8(ref), qt, "transpose_fp8")


def test_block1x128_scales_are_k_block_major():
    x = make_x(200, 272, torch.bfloat16)
    rows, cols = Q.quantize_rows_and_columns(x, "block1x128")
    assert rows.scale.shape == (200, 3) and rows.scale.stride() == (1, 200)
    assert cols.scale.shape == (272, 2) and cols.scale.stride() == (1, 272)


def test_transpose_fp8_refuses_groups_along_the_contraction_dim():
    x = make_x(128, 128, torch.bfloat16)
    for scaling in ("block1x128", "row"):
        with pytest.raises(ValueError, match="not transposable"):
            Q.transpose_fp8(R.quantize_rows_reference(x, scaling))
    t = R.quantize_weight_reference(make_x(200, 272, torch.float32), "block128x128")
    assert torch.equal(R.dequantize(Q.transpose_fp8(t)), R.dequantize(t).t())


@pytest.mark.parametrize("scaling", Q.ACTIVATION_SCALINGS + ("block128x128",))
def test_zeros_give_zero_data_and_the_floor_scale(scaling):
    x = make_x(200, 272, torch.float32)
    x[:, 128:256] = 0  # whole 1x128 groups of zeros
    x[128:] = 0  # and whole rows / 128x128 blocks
    with poisoned_allocations():
        (rows, cols) = Q._quantize(x, scaling, rows=True, cols=True)
    assert_same(rows, R.quantize_rows_reference(x, scaling), "rows")
    assert_same(cols, R.quantize_columns_reference(x, scaling), "columns")
    zeros = Q._quantize(torch.zeros(130, 144), scaling, rows=True, cols=False)[0]
    assert (zeros.data.float() == 0).all()
    assert torch.allclose(zeros.scale, torch.full_like(zeros.scale, AMAX_FLOOR / FP8_MAX))


@pytest.mark.parametrize("scaling", Q.ACTIVATION_SCALINGS + ("block128x128",))
def test_large_and_tiny_magnitudes_equal_the_reference(scaling):
    x = make_x(130, 272, torch.float32, seed=3)
    x[:64] *= 1e30
    x[64:, :128] *= 1e-30
    with poisoned_allocations():
        rows, cols = Q._quantize(x, scaling, rows=True, cols=True)
    assert_same(rows, R.quantize_rows_reference(x, scaling), "rows")
    assert_same(cols, R.quantize_columns_reference(x, scaling), "columns")
    assert torch.isfinite(R.dequantize(rows)).all()


@pytest.mark.parametrize("scaling", ("block1x128", "block128x128", "row", "tensor"))
def test_dequantisation_error_bound(scaling):
    x = make_x(200, 272, torch.float32, seed=4)
    t = R.quantize_rows_reference(x, scaling)
    s = R._expand(t.scale, scaling, *x.shape)
    bound = 2.0 ** -4 * x.abs() + 2.0 ** -10 * s
    err = (x - R.dequantize(t)).abs()
    assert (err <= bound * (1 + 1e-5)).all(), (err / bound).max()
    # The bound is tight: some element sits within 10% of it.
    assert (err / bound).max() > 0.9


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_x(64, 272, torch.bfloat16, device="cpu")
    rows, cols = Q.quantize_rows_and_columns(x, "block1x128")
    assert_same(rows, R.quantize_rows_reference(x, "block1x128"))
    assert_same(cols, R.quantize_columns_reference(x, "block1x128"))


def run_delayed_steps(gains, length, M, K, device=DEVICE, seed=0):
    """Quantises one site's tensors x_n = gain_n * randn (rows, columns, then both, in turn)
    under delayed scaling with history `length`; checks each against the reference quantised
    with the amax delayed scaling must use (the first tensor's own, then the largest of the
    previous `length`) and the recorded amaxes against the tensors' own. Returns the history."""
    from kernels.fp8.amax_history import AmaxHistory

    history = AmaxHistory(length)
    own = []
    for n, gain in enumerate(gains):
        x = make_x(M, K, torch.bfloat16, seed=seed + n, device=device) * gain
        amax = torch.stack(own[-length:]).max() if own else x.float().abs().max()
        own.append(x.float().abs().max())
        with poisoned_allocations():
            form = n % 3
            if form == 0:
                outs = [(Q.quantize_rows(x, "tensor", history), R.quantize_rows_reference)]
            elif form == 1:
                outs = [(Q.quantize_columns(x, "tensor", history),
                         R.quantize_columns_reference)]
            else:
                rows, cols = Q.quantize_rows_and_columns(x, "tensor", history)
                outs = [(rows, R.quantize_rows_reference), (cols, R.quantize_columns_reference)]
        for got, ref in outs:
            assert_same(got, ref(x, "tensor", amax), f"step {n} (gain {gain})")
        recorded = history.amaxes[(history.recorded - 1) % (length + 1)]
        assert torch.equal(recorded, own[-1]), (n, recorded, own[-1])
    return history


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_delayed_tensor_scaling_uses_the_previous_amaxes_and_records_its_own(path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    # Growth past the delayed scale (saturation), decay below it, and a window that rolls over.
    history = run_delayed_steps([1.0, 4.0, 0.5, 0.25, 0.1, 0.1, 2.0], length=2, M=200, K=272,
                                device="cpu" if path == "reference" else DEVICE)
    assert history.recorded == 7


def test_delayed_scaling_needs_tensor_scaling():
    from kernels.fp8.amax_history import AmaxHistory

    x = make_x(16, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="needs tensor scaling"):
        Q.quantize_rows(x, "row", AmaxHistory())
    with pytest.raises(ValueError, match="length must be >= 1"):
        AmaxHistory(0)


def test_rejects_bad_scalings_and_shapes():
    x = make_x(16, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="scaling"):
        Q.quantize_rows(x, "block128x128")
    with pytest.raises(ValueError, match="scaling"):
        Q.quantize_weight(x, "block1x128")
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_rows(x[None], "tensor")


@pytest.mark.gpu
@pytest.mark.parametrize("M,K", [(4096, 2048), (4000, 2064), (4001, 1536), (16384, 4096)])
@pytest.mark.parametrize("scaling", Q.ACTIVATION_SCALINGS)
def test_gpu_quantisers_equal_the_reference_at_real_shapes(M, K, scaling):
    x = make_x(M, K, torch.bfloat16, seed=M)
    with poisoned_allocations():
        rows, cols = Q.quantize_rows_and_columns(x, scaling)
        only_rows = Q.quantize_rows(x, scaling)
    assert_same(rows, R.quantize_rows_reference(x, scaling), f"rows {M}x{K}")
    assert_same(cols, R.quantize_columns_reference(x, scaling), f"columns {M}x{K}")
    assert_same(only_rows, R.quantize_rows_reference(x, scaling), f"rows only {M}x{K}")


@pytest.mark.gpu
def test_gpu_delayed_tensor_scaling_at_real_shapes():
    run_delayed_steps([1.0, 4.0, 0.5, 0.25, 2.0], length=3, M=16384, K=4096)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(1536, 2048), (2000, 2064)])
@pytest.mark.parametrize("scaling", Q.WEIGHT_SCALINGS)
def test_gpu_weight_quantisers_equal_the_reference(N, K, scaling):
    w = make_x(N, K, torch.bfloat16, seed=N)
    with poisoned_allocations():
        q, qt = Q.quantize_weight_and_transpose(w, scaling)
    assert_same(q, R.quantize_weight_reference(w, scaling), f"weight {N}x{K}")
    assert_same(qt, R.quantize_columns_reference(w, scaling), f"transposed {N}x{K}")
