"""The gated grouped-RMSNorm kernels against the PyTorch reference.

Tolerances: fp32 relative error < 1e-5 (orders of summation differ). bf16 output < 1e-3 (the
kernel rounds where PyTorch does; only the reduction order differs). bf16 gradients are measured
against fp32 autograd through the reference on the same bf16-valued inputs: < 1e-2, and no worse
than the unfused bf16 path's error times ACCURACY_FACTOR. Without a GPU the kernels run in
Triton's interpreter at small shapes; the `gpu` tests run Ring-mini shapes. Every kernel output
is poisoned with NaN before a launch, so an element it fails to write fails the test.
The lightning layer with both fused kernels is tested in test_qk_norm_rope.py.
"""

import pytest
import torch

from kernels.gated_norm.reference import gated_group_rms_norm_reference
from kernels.gated_norm.triton_ops import (gated_group_rms_norm_triton, launch_backward,
                                           launch_forward)
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.norms import GroupedRMSNorm
from ring_train.model.transformer_config import to_transformer_config
from tests.kernels.kernel_testing import (BF16_FWD_TOL, DEVICE, EPS, FP32_TOL, assert_grads_match,
                                          rel_err)


def make_inputs(s, b, H, D, dtype, seed, device=DEVICE):
    """o [s, b, H, D]; gate a strided [s, b, H, D] slice of a fused [s, b, H, 4, D] projection
    (as the unfused layer passes it); weight [H*D]; output gradient [s, b, H*D]."""
    g = torch.Generator(device=device).manual_seed(seed)
    o = torch.randn(s, b, H, D, generator=g, device=device).to(dtype)
    gate = (2 * torch.randn(s, b, H, 4, D, generator=g, device=device)).to(dtype)[:, :, :, 3]
    weight = (1 + 0.2 * torch.randn(H * D, generator=g, device=device)).to(dtype)
    dy = torch.randn(s, b, H * D, generator=g, device=device).to(dtype)
    return o, gate, weight, dy


def run_with_grads(fn, o, gate, weight, dy, groups, dtype=None):
    """Output and gradients (o, gate, weight) of fn, on copies cast to dtype."""
    dtype = dtype or o.dtype
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (o, gate, weight)]
    y = fn(*leaves, groups, EPS)
    y.backward(dy.to(dtype))
    return y.detach(), [x.grad for x in leaves]


def run_poisoned(o, gate, weight, dy, groups):
    """Forward and backward launches into NaN-filled outputs."""
    s, b, H, D = gate.shape
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=o.dtype, device=o.device)
    o2 = o.reshape(s * b, H * D)
    y = nan(s * b, H * D)
    launch_forward(o2, gate, weight, groups, EPS, y)
    do, dgate = nan(s * b, H * D), nan(s, b, H, D)
    dw = launch_backward(o2, gate, weight, groups, EPS, dy.reshape(s * b, H * D), do, dgate)
    return y.view(s, b, H * D), [do.view(o.shape), dgate, dw]


def check_against_reference(s, b, H, D, groups, dtype, seed):
    o, gate, weight, dy = make_inputs(s, b, H, D, dtype, seed)
    y, grads = run_poisoned(o, gate, weight, dy, groups)
    y_ref, ref_grads = run_with_grads(gated_group_rms_norm_reference, o, gate, weight, dy, groups)
    assert torch.isfinite(y).all(), "unwritten (NaN) elements"
    assert rel_err(y, y_ref) < (FP32_TOL if dtype == torch.float32 else BF16_FWD_TOL)
    _, true_grads = run_with_grads(gated_group_rms_norm_reference, o, gate, weight, dy, groups,
                                   dtype=torch.float32)
    assert_grads_match(("do", "dgate", "dweight"), grads, ref_grads, true_grads, dtype)


def test_reference_is_the_layer_code_path_to_the_bit():
    s, b, H, D, groups = 5, 3, 4, 16, 2
    for dtype in (torch.float32, torch.bfloat16):
        o, gate, weight, _ = make_inputs(s, b, H, D, dtype, seed=1)
        config = to_transformer_config(load_model_config("tiny"), ParallelConfig(),
                                       params_dtype=dtype)
        norm = GroupedRMSNorm(config, H * D, groups, eps=EPS).to(DEVICE)
        with torch.no_grad():
            norm.weight.copy_(weight)
        out = o.reshape(s, b, H * D)
        layer = norm(out) * torch.sigmoid(gate.reshape_as(out))  # LightningAttention.forward
        assert torch.equal(gated_group_rms_norm_reference(o, gate, weight, groups, EPS), layer)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,D,groups", [(4, 16, 2), (6, 16, 2), (2, 32, 1)],
                         ids=["2-heads-per-group", "group-not-pow2", "one-group"])
def test_forward_backward_match_reference(dtype, H, D, groups):
    check_against_reference(9, 2, H, D, groups, dtype, seed=H + D)


def test_bf16_forward_equals_the_layer_code_path_bit_for_bit():
    o, gate, weight, _ = make_inputs(17, 2, 4, 32, torch.bfloat16, seed=2)
    y = gated_group_rms_norm_triton(o, gate, weight, 2, EPS)
    assert torch.equal(y, gated_group_rms_norm_reference(o, gate, weight, 2, EPS))


@pytest.mark.parametrize("flat_o,flat_gate", [(True, True), (False, False)],
                         ids=["flat", "strided-gate"])
def test_autograd_function_matches_launches(flat_o, flat_gate):
    s, b, H, D, groups = 6, 2, 4, 16, 2
    o, gate, weight, dy = make_inputs(s, b, H, D, torch.bfloat16, seed=3)
    o_in = o.reshape(s, b, H * D) if flat_o else o
    gate_in = gate.reshape(s, b, H * D) if flat_gate else gate
    y, grads = run_with_grads(gated_group_rms_norm_triton, o_in, gate_in, weight, dy, groups)
    y_launch, launch_grads = run_poisoned(o, gate.contiguous(), weight, dy, groups)
    assert y.shape == (s, b, H * D) and torch.equal(y, y_launch)
    for g, g_launch, x in zip(grads, launch_grads, (o_in, gate_in, weight)):
        assert g.shape == x.shape and torch.equal(g, g_launch.to(g.dtype).reshape(x.shape))


def test_mismatched_shapes_are_an_error():
    o, gate, weight, _ = make_inputs(4, 1, 2, 16, torch.float32, seed=4)
    with pytest.raises(ValueError, match="weight.numel"):
        gated_group_rms_norm_triton(o, gate, weight[:16], 1, EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("s,b", [(4096, 2), (8192, 1)])
def test_ring_mini_shapes_match_reference_on_gpu(s, b):
    check_against_reference(s, b, 16, 128, 4, torch.bfloat16, seed=s + b)
