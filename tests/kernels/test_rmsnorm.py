"""Triton RMSNorm (with fused FP8 emission of y) against the PyTorch reference.

Tolerances:
  rstd (fp32)           1e-6 relative (summation order and the GPU's rsqrt differ);
  y                     bit-equal to the reference evaluated with the kernel's rstd (the rest is
                        exact IEEE arithmetic), and within 2 ulp of the reference end to end (a
                        last-bit change of rstd can move the normalised value by one ulp, and
                        weight * n by one more);
  FP8 rows / columns    as in test_swiglu: against the quantiser applied to the kernel's y, >=
                        99.9% equal bytes, within one e4m3 step, scales 1e-6 (CPU: exact);
  dx, dweight           relative error (norm) 2^-8 against the closed-form reference, and against
                        fp32 autograd: dx 2^-8 (one rounding), y and dweight 2^-7 (two roundings:
                        the normalised value is rounded to x's dtype before the weight).
Every kernel output is NaN-filled before the launch. `gpu` tests run Ring-mini's shape
(8192 tokens, hidden 2048).
"""

import pytest
import torch

from kernels.rmsnorm import rms_norm, rms_norm_backward, rms_norm_forward
from kernels.rmsnorm.reference import (rms_norm_backward_reference, rms_norm_forward_reference,
                                       rms_norm_reference, rms_rstd)
from kernels.rmsnorm.triton_ops import CONFIG, check_inputs, launch_backward, launch_forward
from kernels.swiglu.producer import Emitted
from tests.kernels.kernel_testing import DEVICE, rel_err
from tests.kernels.test_swiglu import ALL, assert_emitted_match, assert_same_forms, poisoned

EPS = 1e-6
# M = 200: partial row blocks; d = 200: a partial 128-group; d = 640: row sums over several
# (partial) steps; an fp32 weight promotes y to fp32.
SHAPES = [(200, 256, torch.bfloat16), (200, 200, torch.bfloat16), (200, 256, torch.float32),
          (64, 640, torch.bfloat16), (1, 128, torch.bfloat16)]


def make_inputs(M, d, weight_dtype, seed, device=DEVICE):
    """x [M, d] bf16 (row 0 all zero if M > 1), weight [d], grad_y [M, d] in y's dtype."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = 3 * torch.randn(M, d, generator=g)
    if M > 1:
        x[0] = 0
    weight = 1 + 0.2 * torch.randn(d, generator=g)
    grad_y = torch.randn(M, d, generator=g)
    y_dtype = torch.promote_types(torch.bfloat16, weight_dtype)
    return (x.to(device, torch.bfloat16), weight.to(device, weight_dtype),
            grad_y.to(device, y_dtype))


def run_forward(x, weight, emit=ALL, rstd=None) -> tuple[Emitted, torch.Tensor]:
    x, weight = check_inputs(x, weight)
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = poisoned(x.shape[0], x.shape[1], emit, x.device, y_dtype)
    compute = rstd is None
    if compute:
        rstd = torch.full((x.shape[0],), float("nan"), device=x.device)
    launch_forward(x, weight, EPS, rstd, compute, *out)
    return out, rstd


def check_forward(M, d, weight_dtype, seed):
    x, weight, _ = make_inputs(M, d, weight_dtype, seed)
    got, rstd = run_forward(x, weight)
    ref_rstd = rms_rstd(x, EPS)
    assert ((rstd - ref_rstd).abs() <= 1e-6 * ref_rstd).all()
    assert torch.equal(got.out, rms_norm_reference(x, weight, EPS, rstd=rstd))
    # 2 ulps of x's dtype, where the normalised value is rounded (16 more bits in fp32 output).
    ulps = 2 << (16 if got.out.dtype == torch.float32 and x.dtype == torch.bfloat16 else 0)
    assert_emitted_match(got, rms_norm_reference(x, weight, EPS), max_ulps=ulps)
    # A recompute from the saved rstd (one pass, 128-row tiles) gives the same bytes.
    again, _ = run_forward(x, weight, ("columns", "rows"), rstd=rstd)
    assert_same_forms(again, got, ("columns", "rows"))


def check_backward(M, d, weight_dtype, seed):
    x, weight, grad_y = make_inputs(M, d, weight_dtype, seed)
    x, weight = check_inputs(x, weight)
    rstd = rms_rstd(x, EPS)
    dx = torch.full_like(x, float("nan"))
    dw_partial = torch.full((-(-M // CONFIG.bwd_block_m), d), float("nan"), device=x.device)
    launch_backward(grad_y, x, weight, rstd, dx, dw_partial)
    dweight = dw_partial.sum(0).to(weight.dtype)
    ref_dx, ref_dweight = rms_norm_backward_reference(grad_y, x, weight, rstd)
    assert rel_err(dx.float(), ref_dx.float()) <= 2 ** -8
    assert rel_err(dweight.float(), ref_dweight.float()) <= 2 ** -8


@pytest.mark.parametrize("M,d,weight_dtype", SHAPES)
def test_forward_emits_y_rows_columns_and_rstd_matching_reference(M, d, weight_dtype):
    check_forward(M, d, weight_dtype, seed=M + d)


@pytest.mark.parametrize("M,d,weight_dtype", SHAPES)
def test_backward_dx_and_dweight_match_reference(M, d, weight_dtype):
    check_backward(M, d, weight_dtype, seed=M + d + 1)


@pytest.mark.parametrize("emit", [("out",), ("rows",), ("columns",), ("out", "rows")])
@pytest.mark.parametrize("saved_rstd", [False, True])
def test_each_form_alone_equals_the_all_forms_run(emit, saved_rstd):
    x, weight, _ = make_inputs(200, 256, torch.bfloat16, seed=3)
    full, rstd = rms_norm_forward(x, weight, EPS, emit=ALL)
    got, got_rstd = rms_norm_forward(x, weight, EPS, emit=emit,
                                     rstd=rstd if saved_rstd else None)
    assert torch.equal(got_rstd, rstd)
    assert_same_forms(got, full, emit)


def test_reference_is_the_model_rmsnorm():
    from ring_train.model.norms import rms_normalize

    x, weight, _ = make_inputs(64, 256, torch.bfloat16, seed=4)
    assert torch.equal(rms_norm_forward_reference(x, weight, EPS)[0].out,
                       weight * rms_normalize(x, EPS))


def test_autograd_function_matches_fp32_autograd_on_3d_strided_input():
    M, d = 200, 256
    x, weight, grad_y = make_inputs(M, d, torch.bfloat16, seed=5)
    wide = torch.zeros(M, d + 64, dtype=x.dtype, device=x.device)
    wide[:, :d] = x
    xv = wide[:, :d].view(2, M // 2, d).detach().requires_grad_(True)  # row stride d + 64
    w = weight.clone().requires_grad_(True)
    y = rms_norm(xv, w, EPS)
    y.backward(grad_y.view(2, M // 2, d))

    x32 = x.float().requires_grad_(True)
    w32 = weight.float().requires_grad_(True)
    y32 = rms_norm_reference(x32, w32, EPS)
    y32.backward(grad_y.float())

    assert y.shape == (2, M // 2, d) and y.dtype == torch.bfloat16
    assert rel_err(y.reshape(M, d).float(), y32) <= 2 ** -7
    assert rel_err(xv.grad.reshape(M, d).float(), x32.grad) <= 2 ** -8 + 1e-5
    assert rel_err(w.grad.float(), w32.grad) <= 2 ** -7


def test_saved_rstd_of_wrong_shape_is_an_error():
    x, weight, _ = make_inputs(8, 128, torch.bfloat16, seed=6)
    with pytest.raises(ValueError, match="rstd must be"):
        rms_norm_forward(x, weight, EPS, emit=("columns",), rstd=torch.ones(4, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path without Triton")
def test_dispatch_runs_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, grad_y = make_inputs(200, 256, torch.bfloat16, seed=7)
    got, rstd = rms_norm_forward(x, weight, EPS, emit=ALL)
    ref, ref_rstd = rms_norm_forward_reference(x, weight, EPS, emit=ALL)
    assert torch.equal(got.out, ref.out) and torch.equal(rstd, ref_rstd)
    dx, dweight = rms_norm_backward(grad_y, x, weight, rstd)
    ref_dx, ref_dweight = rms_norm_backward_reference(grad_y, x, weight, rstd)
    assert torch.equal(dx, ref_dx) and torch.equal(dweight, ref_dweight)


@pytest.mark.gpu
def test_ring_mini_shape_matches_reference_on_gpu():
    check_forward(8192, 2048, torch.bfloat16, seed=8)
    check_backward(8192, 2048, torch.bfloat16, seed=9)


@pytest.mark.gpu
def test_partial_blocks_and_fp32_weight_on_gpu():
    check_forward(8192 + 72, 2048 + 64, torch.float32, seed=10)
    check_backward(8192 + 72, 2048 + 64, torch.float32, seed=11)
