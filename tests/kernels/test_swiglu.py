"""Triton SwiGLU (with routing weight and fused FP8 emission) against the PyTorch reference.

Tolerances:
  out, grad_h (bf16)    at most 1 ulp from the reference (same fp32 formulas; the kernels' sigmoid
                        may differ from torch's in the last fp32 bits, which can move a rounding);
  FP8 rows / columns    against kernels/fp8/reference.py's quantiser applied to the kernel's own
                        bf16 tensor: >= 99.9% equal bytes, dequantised values within one e4m3
                        step, scales within 1e-6 relative (the CPU runs are byte-exact); and
                        end to end against the quantised reference tensor: the same, except that
                        a scale may move with a one-ulp change of its group's amax;
  grad_probs (fp32)     within 1e-5 of the sum of |terms| (summation order differs);
  vs fp32 autograd      relative error (norm) <= 2^-8 for bf16 tensors (each element is the
                        fp32 value rounded once), 1e-5 for fp32 ones.
Every kernel output is NaN-filled before the launch, so an element it fails to write fails.
Without a GPU the kernels run in Triton's interpreter at small shapes; `gpu` tests run the
Ring-mini routed-expert shape (8192 tokens x top-8 rows, F = 512).
"""

import pytest
import torch

from kernels.fp8.reference import quantize_columns_reference, quantize_rows_reference
from kernels.fp8.tensor import AMAX_FLOOR, FP8_MAX, Fp8Tensor
from kernels.swiglu import swiglu, swiglu_backward, swiglu_forward
from kernels.swiglu.producer import Emitted, empty_block1x128
from kernels.swiglu.reference import (fp8_agreement, swiglu_backward_reference,
                                      swiglu_forward_reference, swiglu_reference, ulp_distance)
from kernels.swiglu.triton_ops import check_inputs, launch_backward, launch_forward
from tests.kernels.kernel_testing import DEVICE, rel_err

ALL = ("out", "rows", "columns")
# M = 200: a partial block of rows; F = 192: a partial 128-group along F.
SHAPES = [(200, 256, True), (200, 256, False), (200, 192, True), (1, 128, True)]


def make_inputs(M, F, seed, device=DEVICE):
    """h [M, 2F] bf16 (rows 0 and 1 all zero if M > 2: amax-floor groups), probs [M] fp32,
    grad_out [M, F] bf16."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = 2 * torch.randn(M, 2 * F, generator=g)
    if M > 2:
        h[:2] = 0
    probs = torch.rand(M, generator=g)
    grad_out = torch.randn(M, F, generator=g)
    return (h.to(device, torch.bfloat16), probs.to(device),
            grad_out.to(device, torch.bfloat16))


def poisoned(R, K, emit, device=DEVICE, dtype=torch.bfloat16):
    """NaN-filled outputs for a producer of out [R, K] emitting `emit`."""
    def fp8(R, K):
        t = empty_block1x128(R, K, device)
        t.data.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
        t.scale.fill_(float("nan"))
        return t

    out = torch.full((R, K), float("nan"), dtype=dtype, device=device) if "out" in emit else None
    return Emitted(out, fp8(R, K) if "rows" in emit else None,
                   fp8(K, R) if "columns" in emit else None)


def assert_fp8_matches(got: Fp8Tensor, ref: Fp8Tensor, exact_scales=True):
    R = ref.data.shape[0]
    assert got.scaling == "block1x128" and got.data.is_contiguous()
    if R > 1:  # K-block-major scales (strides (1, R)), as tensor.py prescribes
        assert got.scale.stride(0) == 1 and got.scale.stride(1) == R
    agreement = fp8_agreement(got, ref)
    assert agreement["equal_bytes"] >= 0.999, agreement
    assert agreement["max_step_error"] <= 1 + 1e-5, agreement
    assert agreement["scale_max_rel"] <= (1e-6 if exact_scales else 2 ** -7), agreement


def assert_emitted_match(got: Emitted, ref_out: torch.Tensor, max_ulps=1):
    """got's out within max_ulps of ref_out; its FP8 forms quantise its out (and ref_out)."""
    if got.out is not None:
        assert torch.isfinite(got.out).all(), "unwritten (NaN) elements"
        assert ulp_distance(got.out, ref_out).max() <= max_ulps
    quantised = got.out if got.out is not None else ref_out
    for form, quantise in (("rows", quantize_rows_reference),
                           ("columns", quantize_columns_reference)):
        t = getattr(got, form)
        if t is not None:
            if got.out is not None:
                assert_fp8_matches(t, quantise(quantised, "block1x128"))
            assert_fp8_matches(t, quantise(ref_out, "block1x128"), exact_scales=False)


def assert_same_forms(got: Emitted, full: Emitted, emit):
    """got holds exactly the forms in `emit`, bit-equal to those of `full`."""
    for form in ALL:
        t, r = getattr(got, form), getattr(full, form)
        if form not in emit:
            assert t is None
        elif form == "out":
            assert torch.equal(t, r)
        else:
            assert torch.equal(t.data.view(torch.uint8), r.data.view(torch.uint8))
            assert torch.equal(t.scale, r.scale)


def run_forward(h, probs, emit=ALL) -> Emitted:
    h, probs = check_inputs(h, probs)
    out = poisoned(h.shape[0], h.shape[1] // 2, emit, h.device)
    launch_forward(h, probs, *out)
    return out


def run_backward(grad_out, h, probs, emit=ALL):
    h, probs = check_inputs(h, probs)
    grads = poisoned(h.shape[0], h.shape[1], emit, h.device)
    grad_probs = None
    if probs is not None:
        grad_probs = torch.full_like(probs, float("nan"))
    launch_backward(grad_out, h, probs, *grads, grad_probs)
    return grads, grad_probs


def check_forward(M, F, with_probs, seed):
    h, probs, _ = make_inputs(M, F, seed)
    probs = probs if with_probs else None
    got = run_forward(h, probs)
    assert_emitted_match(got, swiglu_reference(h, probs))
    return got


def check_backward(M, F, with_probs, seed):
    h, probs, grad_out = make_inputs(M, F, seed)
    probs = probs if with_probs else None
    emit = ALL if F % 128 == 0 else ("out", "columns")
    grads, grad_probs = run_backward(grad_out, h, probs, emit)
    (ref_grad_h, _, _), ref_grad_probs = swiglu_backward_reference(grad_out, h, probs)
    assert_emitted_match(grads, ref_grad_h)
    if probs is not None:
        gate, up = torch.chunk(h.float(), 2, -1)
        terms = (grad_out.float() * torch.nn.functional.silu(gate) * up).abs().sum(-1)
        assert ((grad_probs - ref_grad_probs).abs() <= 1e-5 * terms + 1e-30).all()


@pytest.mark.parametrize("M,F,with_probs", SHAPES)
def test_forward_emits_out_rows_and_columns_matching_reference(M, F, with_probs):
    check_forward(M, F, with_probs, seed=M + F)


@pytest.mark.parametrize("M,F,with_probs", SHAPES)
def test_backward_emits_grad_h_forms_and_grad_probs_matching_reference(M, F, with_probs):
    check_backward(M, F, with_probs, seed=M + F + 1)


@pytest.mark.parametrize("emit", [("out",), ("rows",), ("columns",), ("rows", "columns")])
def test_each_form_alone_equals_the_all_forms_run(emit):
    h, probs, grad_out = make_inputs(200, 256, seed=3)
    full = swiglu_forward(h, probs, emit=ALL)
    full_grads, full_grad_probs = swiglu_backward(grad_out, h, probs, emit=ALL)
    assert_same_forms(swiglu_forward(h, probs, emit=emit), full, emit)
    assert_same_forms(swiglu_backward(grad_out, h, probs, emit=emit)[0], full_grads, emit)
    assert torch.equal(swiglu_backward(grad_out, h, probs, emit=emit)[1], full_grad_probs)


def test_all_zero_groups_quantise_to_zero_with_floor_scale():
    h, probs, grad_out = make_inputs(200, 256, seed=4)
    rows = swiglu_forward(h, probs, emit=("rows",)).rows
    assert (rows.data[:2].float() == 0).all()
    assert torch.equal(rows.scale[:2], torch.full_like(rows.scale[:2], AMAX_FLOOR / FP8_MAX))


def test_autograd_function_matches_fp32_autograd_on_3d_strided_input():
    M, F = 200, 256
    h, probs, grad_out = make_inputs(M, F, seed=5)
    wide = torch.zeros(M, 2 * F + 64, dtype=h.dtype, device=h.device)
    wide[:, :2 * F] = h
    h_view = wide[:, :2 * F].view(2, M // 2, 2 * F)  # rows through a stride of 2F + 64
    x = h_view.detach().requires_grad_(True)
    p = probs.view(2, M // 2).clone().requires_grad_(True)
    out = swiglu(x, p)
    out.backward(grad_out.view(2, M // 2, F))

    x32 = h.float().requires_grad_(True)
    p32 = probs.clone().requires_grad_(True)
    out32 = swiglu_reference(x32, p32)
    out32.backward(grad_out.float())

    assert out.shape == (2, M // 2, F) and out.dtype == torch.bfloat16
    bound = 2 ** -8 + 1e-5
    assert rel_err(out.reshape(M, F).float(), out32) <= bound
    assert rel_err(x.grad.reshape(M, 2 * F).float(), x32.grad) <= bound
    assert rel_err(p.grad.reshape(M), p32.grad) <= 1e-5


def test_autograd_without_probs():
    h, _, grad_out = make_inputs(64, 128, seed=6)
    x = h.clone().requires_grad_(True)
    swiglu(x).backward(grad_out)
    x32 = h.float().requires_grad_(True)
    swiglu_reference(x32).backward(grad_out.float())
    assert rel_err(x.grad.float(), x32.grad) <= 2 ** -8 + 1e-5


def test_grad_h_rows_need_whole_groups_per_half():
    h, probs, grad_out = make_inputs(8, 192, seed=7)
    with pytest.raises(ValueError, match="F % 128"):
        swiglu_backward(grad_out, h, probs, emit=("rows",))


@pytest.mark.parametrize("emit", [(), ("bf16",), ("rows", "transpose")])
def test_unknown_or_empty_emit_is_an_error(emit):
    h, probs, _ = make_inputs(8, 128, seed=8)
    with pytest.raises(ValueError, match="emit must be"):
        swiglu_forward(h, probs, emit=emit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path without Triton")
def test_dispatch_runs_reference_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, probs, grad_out = make_inputs(200, 256, seed=9)
    got = swiglu_forward(h, probs, emit=ALL)
    ref = swiglu_forward_reference(h, probs, emit=ALL)
    assert torch.equal(got.out, ref.out)
    assert torch.equal(got.rows.data.view(torch.uint8), ref.rows.data.view(torch.uint8))
    grads, grad_probs = swiglu_backward(grad_out, h, probs)
    ref_grads, ref_grad_probs = swiglu_backward_reference(grad_out, h, probs)
    assert torch.equal(grads.out, ref_grads.out) and torch.equal(grad_probs, ref_grad_probs)


@pytest.mark.gpu
@pytest.mark.parametrize("with_probs", [True, False])
def test_ring_mini_routed_expert_shape_matches_reference_on_gpu(with_probs):
    check_forward(8192 * 8, 512, with_probs, seed=10)
    check_backward(8192 * 8, 512, with_probs, seed=11)


@pytest.mark.gpu
def test_rows_only_and_columns_only_launches_on_gpu():
    h, probs, grad_out = make_inputs(8192 * 8 + 72, 512, seed=12)  # a partial 128-row block
    ref = swiglu_reference(h, probs)
    assert_emitted_match(run_forward(h, probs, ("rows",)), ref)
    assert_emitted_match(run_forward(h, probs, ("columns",)), ref)
    (ref_grad_h, _, _), _ = swiglu_backward_reference(grad_out, h, probs)
    assert_emitted_match(run_backward(grad_out, h, probs, ("rows",))[0], ref_grad_h)
