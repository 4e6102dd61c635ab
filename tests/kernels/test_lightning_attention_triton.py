"""Triton lightning attention against the PyTorch reference (bf16 in/out, relative error < 1e-2).

Without a GPU the kernels run in Triton's interpreter at small shapes (tests/kernels/conftest.py);
the `gpu` tests run the real shapes. Every kernel output is filled with NaN before the launch, so
an element the kernel fails to write fails the test.
"""

import pytest
import torch

from kernels.lightning_attention.reference import (lightning_attention_chunked,
                                                   lightning_attention_decode_reference)
from kernels.lightning_attention.triton_ops import (launch_backward, launch_decode,
                                                    launch_forward, lightning_attention_triton,
                                                    plan_segments)
from tests.kernels.kernel_testing import DEVICE, rel_err

TOL = 1e-2


def assert_close(a, b, tol=TOL):
    assert torch.isfinite(a).all(), "unwritten (NaN) or non-finite elements"
    err = rel_err(a, b)
    assert err < tol, err


def make_inputs(T, B, H, D, N, seed, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(T, B, H, D, generator=g, device=device).bfloat16() for _ in range(3))
    # Decays from fast (lambda ~ 0.4) to slow (lambda ~ 0.996), as in the model's heads.
    slope = torch.logspace(0, -2.4, H, device=device) * (0.9 + 0.2 * torch.rand(
        H, generator=g, device=device))
    h0 = torch.randn(N, H, D, D, generator=g, device=device)
    do = torch.randn(T, B, H, D, generator=g, device=device).bfloat16()
    dht = torch.randn(N, H, D, D, generator=g, device=device)
    return q, k, v, slope, h0, do, dht


def reference_grads(q, k, v, slope, h0, do, dht, cu_seqlens):
    """Outputs and gradients of the fp32 chunked reference on the same (bf16-valued) inputs."""
    leaves = [x.float().requires_grad_(True) for x in (q, k, v)]
    h0r = None if h0 is None else h0.clone().requires_grad_(True)
    o, ht = lightning_attention_chunked(*leaves, slope, initial_state=h0r,
                                        output_final_state=True, cu_seqlens=cu_seqlens)
    loss = (o * do.float()).sum() + (0 if dht is None else (ht * dht).sum())
    loss.backward()
    grads = [x.grad for x in leaves] + [None if h0r is None else h0r.grad]
    return o.detach(), ht.detach(), grads


def run_poisoned(q, k, v, slope, h0, do, dht, cu_seqlens, segment_len):
    """Forward and backward launches into NaN-filled outputs."""
    T, B, H, D = q.shape
    plan = plan_segments(T, B, H, D, cu_seqlens, q.device, segment_len)
    nan = lambda *shape, dtype=torch.float32: torch.full(shape, float("nan"), dtype=dtype,
                                                         device=q.device)
    o, ht = nan(T, B, H, D, dtype=q.dtype), nan(plan.num_seqs, H, D, D)
    scale = D ** -0.5
    s_in = launch_forward(q, k, v, slope, scale, h0, plan, o, ht)
    dq, dk, dv = (nan(T, B, H, D, dtype=q.dtype) for _ in range(3))
    dh0 = None if h0 is None else nan(*h0.shape)
    launch_backward(q, k, v, do, slope, scale, h0, s_in, dht, plan, dq, dk, dv, dh0)
    return o, ht, [dq, dk, dv, dh0], plan


def check_against_reference(T, B, H, D, seed, segment_len, bounds=None, with_h0=True,
                            with_dht=True):
    N = B if bounds is None else len(bounds) - 1
    q, k, v, slope, h0, do, dht = make_inputs(T, B, H, D, N, seed)
    h0 = h0 if with_h0 else None
    dht = dht if with_dht else None
    cu = None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device=q.device)
    o, ht, grads, plan = run_poisoned(q, k, v, slope, h0, do, dht, cu, segment_len)
    o_ref, ht_ref, grads_ref = reference_grads(q, k, v, slope, h0, do, dht, cu)
    assert_close(o.float(), o_ref)
    assert_close(ht, ht_ref)
    for name, g, g_ref in zip(("dq", "dk", "dv", "dh0"), grads, grads_ref):
        if g_ref is not None:
            assert torch.isfinite(g).all(), name
            assert rel_err(g.float(), g_ref) < TOL, (name, rel_err(g.float(), g_ref))
    return plan


@pytest.mark.parametrize("T,B,D,segment_len", [(77, 2, 16, None), (200, 1, 32, 64),
                                               (130, 2, 16, 128)])
def test_forward_backward_match_reference_with_states(T, B, D, segment_len):
    plan = check_against_reference(T, B, 2, D, seed=T + D, segment_len=segment_len)
    assert plan.split == (segment_len is not None and segment_len < T)


def test_without_initial_state_or_final_state_gradient():
    check_against_reference(150, 1, 2, 16, seed=5, segment_len=64, with_h0=False,
                            with_dht=False)


@pytest.mark.parametrize("segment_len", [None, 64])
def test_varlen_resets_state_per_document(segment_len):
    # An empty document, one shorter than a chunk, and ones crossing chunks and segments.
    bounds = [0, 5, 70, 70, 201, 230]
    check_against_reference(230, 1, 2, 16, seed=7, segment_len=segment_len, bounds=bounds)


def test_autograd_function_on_fused_qkv_slices_matches_reference():
    T, B, H, D = 90, 2, 2, 16
    q, k, v, slope, h0, do, dht = make_inputs(T, B, H, D, B, seed=9)
    qkv = torch.cat([q, k, v], dim=-1).requires_grad_(True)  # strided [T, B, H, D] views
    qs, ks, vs = qkv.split(D, dim=-1)
    h0l = h0.clone().requires_grad_(True)
    o, ht = lightning_attention_triton(qs, ks, vs, slope, initial_state=h0l,
                                       output_final_state=True, segment_len=64)
    ((o.float() * do.float()).sum() + (ht * dht).sum()).backward()
    o_ref, ht_ref, grads_ref = reference_grads(q, k, v, slope, h0, do, dht, None)
    assert o.dtype == torch.bfloat16
    assert_close(o.float(), o_ref)
    assert_close(ht, ht_ref)
    for g, g_ref in zip(qkv.grad.split(D, dim=-1), grads_ref[:3]):
        assert_close(g.float(), g_ref)
    assert_close(h0l.grad, grads_ref[3])


def test_decode_step_matches_reference():
    B, H, D = 3, 2, 32
    q, k, v, slope, h0, _, _ = make_inputs(1, B, H, D, B, seed=11)
    q, k, v = q[0], k[0], v[0]
    state, state_ref = h0.clone(), h0.clone()
    o = torch.full((B, H, D), float("nan"), dtype=q.dtype, device=q.device)
    launch_decode(q, k, v, slope, state, D ** -0.5, o)
    o_ref = lightning_attention_decode_reference(q, k, v, slope, state_ref)
    assert_close(o.float(), o_ref.float())
    assert_close(state, state_ref, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T,B,H,D,bounds", [
    (4096, 2, 4, 128, None),
    (4000, 1, 4, 64, None),
    (8192, 1, 2, 128, [0, 1000, 1001, 5000, 8192]),
])
def test_real_shapes_match_reference_on_gpu(T, B, H, D, bounds):
    check_against_reference(T, B, H, D, seed=T + D, segment_len=None, bounds=bounds)


@pytest.mark.gpu
def test_long_sequence_split_into_segments_matches_reference_on_gpu():
    plan = check_against_reference(32768, 1, 2, 128, seed=1, segment_len=None)
    assert plan.split


def test_dispatch_runs_triton_when_selected():
    from kernels.lightning_attention import get_backend, lightning_attention, set_backend

    q, k, v, slope, h0, do, _ = make_inputs(70, 1, 2, 16, 1, seed=13)
    previous = get_backend()
    try:
        set_backend("triton")
        o, ht = lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
    finally:
        set_backend(previous)
    o_ref, ht_ref, _ = reference_grads(q, k, v, slope, h0, do, None, None)
    assert_close(o.float(), o_ref)
    assert_close(ht, ht_ref)
