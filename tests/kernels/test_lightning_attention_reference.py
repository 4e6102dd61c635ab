"""The chunked PyTorch lightning attention against the step-by-step recurrence (fp32)."""

import pytest
import torch

from kernels.lightning_attention import (get_backend, lightning_attention,
                                         lightning_attention_decode, set_backend)
from kernels.lightning_attention.reference import (lightning_attention_chunked,
                                                   lightning_attention_recurrent)
from tests.kernels.kernel_testing import rel_err

H, D = 3, 16
CHUNK = 8  # small chunks, so short sequences still cross several chunk boundaries


def make_inputs(T, B, N, seed, dv=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, B, H, D, generator=g)
    k = torch.randn(T, B, H, D, generator=g)
    v = torch.randn(T, B, H, dv, generator=g)
    slope = torch.rand(H, generator=g) * 0.9 + 0.05
    h0 = torch.randn(N, H, D, dv, generator=g)
    return q, k, v, slope, h0


def leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


def assert_close(a, b, tol=1e-5):
    assert torch.isfinite(a).all()
    err = rel_err(a, b)
    assert err < tol, err


@pytest.mark.parametrize("T", [5, 8, 29])
def test_chunked_matches_recurrent_with_initial_and_final_state(T):
    q, k, v, slope, h0 = make_inputs(T, 2, 2, seed=T)
    a, b = leaves(q, k, v, h0), leaves(q, k, v, h0)
    o1, s1 = lightning_attention_chunked(a[0], a[1], a[2], slope, initial_state=a[3],
                                         output_final_state=True, chunk_size=CHUNK)
    o2, s2 = lightning_attention_recurrent(b[0], b[1], b[2], slope, initial_state=b[3],
                                           output_final_state=True)
    assert_close(o1, o2)
    assert_close(s1, s2)
    g = torch.Generator().manual_seed(100 + T)
    do, ds = torch.randn(o1.shape, generator=g), torch.randn(s1.shape, generator=g)
    ((o1 * do).sum() + (s1 * ds).sum()).backward()
    ((o2 * do).sum() + (s2 * ds).sum()).backward()
    for x, y in zip(a, b):
        assert_close(x.grad, y.grad)


def test_chunked_without_initial_state_and_custom_scale_and_unequal_value_dim():
    q, k, v, slope, _ = make_inputs(19, 2, 2, seed=3, dv=D + 8)
    o1, s1 = lightning_attention_chunked(q, k, v, slope, scale=0.3, output_final_state=True,
                                         chunk_size=CHUNK)
    o2, s2 = lightning_attention_recurrent(q, k, v, slope, scale=0.3, output_final_state=True)
    assert_close(o1, o2)
    assert_close(s1, s2)


def test_default_chunk_size_matches_recurrent_on_multi_chunk_sequence():
    q, k, v, slope, h0 = make_inputs(150, 1, 1, seed=4)
    o1, s1 = lightning_attention_chunked(q, k, v, slope, initial_state=h0, output_final_state=True)
    o2, s2 = lightning_attention_recurrent(q, k, v, slope, initial_state=h0,
                                           output_final_state=True)
    assert_close(o1, o2)
    assert_close(s1, s2)


@pytest.mark.parametrize("bounds", [[0, 3, 11, 12, 30], [0, 8, 8, 16, 21]])
def test_varlen_resets_state_per_document(bounds):
    T = bounds[-1]
    N = len(bounds) - 1
    q, k, v, slope, h0 = make_inputs(T, 1, N, seed=len(bounds) + T)
    cu = torch.tensor(bounds, dtype=torch.int32)
    a = leaves(q, k, v, h0)
    o, s = lightning_attention_chunked(a[0], a[1], a[2], slope, initial_state=a[3],
                                       output_final_state=True, cu_seqlens=cu, chunk_size=CHUNK)
    g = torch.Generator().manual_seed(7)
    do, ds = torch.randn(o.shape, generator=g), torch.randn(s.shape, generator=g)
    ((o * do).sum() + (s * ds).sum()).backward()

    # Each document on its own, through the recurrence.
    b = leaves(q, k, v, h0)
    outs, finals = [], []
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        on, sn = lightning_attention_recurrent(b[0][lo:hi], b[1][lo:hi], b[2][lo:hi], slope,
                                               initial_state=b[3][n:n + 1],
                                               output_final_state=True)
        outs.append(on)
        finals.append(sn)
    o_ref, s_ref = torch.cat(outs), torch.cat(finals)
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    for x, y in zip(a, b):
        assert_close(x.grad, y.grad)


def test_varlen_recurrent_equals_separate_documents():
    bounds = [0, 4, 9]
    q, k, v, slope, h0 = make_inputs(9, 1, 2, seed=11)
    o, s = lightning_attention_recurrent(q, k, v, slope, initial_state=h0,
                                         output_final_state=True,
                                         cu_seqlens=torch.tensor(bounds))
    o0, s0 = lightning_attention_recurrent(q[:4], k[:4], v[:4], slope, initial_state=h0[:1],
                                           output_final_state=True)
    o1, s1 = lightning_attention_recurrent(q[4:], k[4:], v[4:], slope, initial_state=h0[1:],
                                           output_final_state=True)
    assert_close(o, torch.cat([o0, o1]))
    assert_close(s, torch.cat([s0, s1]))


def test_chunked_accepts_strided_sequence_first_views_and_keeps_dtype():
    q, k, v, slope, _ = make_inputs(13, 2, 2, seed=5)
    qkv = torch.cat([q, k, v], dim=-1).bfloat16()  # a fused projection's output, sliced
    qs, ks, vs = qkv.split(D, dim=-1)
    o, _ = lightning_attention_chunked(qs, ks, vs, slope, chunk_size=CHUNK)
    o_ref, _ = lightning_attention_recurrent(qs.contiguous(), ks.contiguous(), vs.contiguous(),
                                             slope)
    assert o.dtype == torch.bfloat16
    assert_close(o.float(), o_ref.float(), tol=1e-2)


def test_decode_steps_match_recurrent():
    T, B = 6, 2
    q, k, v, slope, h0 = make_inputs(T, B, B, seed=9)
    o_ref, s_ref = lightning_attention_recurrent(q, k, v, slope, initial_state=h0,
                                                 output_final_state=True)
    state = h0.clone()
    outs = []
    for t in range(T):
        outs.append(lightning_attention_decode(q[t], k[t], v[t], slope, state))
    assert_close(torch.stack(outs), o_ref)
    assert_close(state, s_ref)


def test_dispatch_runs_torch_backend_on_cpu_and_rejects_unknown_names():
    q, k, v, slope, h0 = make_inputs(10, 1, 1, seed=12)
    previous = get_backend()
    try:
        set_backend("auto")
        o, s = lightning_attention(q, k, v, slope, initial_state=h0, output_final_state=True)
        o_ref, s_ref = lightning_attention_recurrent(q, k, v, slope, initial_state=h0,
                                                     output_final_state=True)
        assert_close(o, o_ref)
        assert_close(s, s_ref)
        with pytest.raises(ValueError, match="backend must be one of"):
            set_backend("cuda")
        set_backend("fla")
        with pytest.raises(RuntimeError, match="fla"):
            lightning_attention(q, k, v, slope)
    finally:
        set_backend(previous)


def test_invalid_shapes_are_rejected_with_the_field_named():
    q, k, v, slope, h0 = make_inputs(10, 2, 2, seed=13)
    with pytest.raises(ValueError, match="cu_seqlens needs B == 1"):
        lightning_attention_chunked(q, k, v, slope, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention_chunked(q, k, v, slope, initial_state=h0[:1])
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        lightning_attention_chunked(q[:, :1], k[:, :1], v[:, :1], slope,
                                    cu_seqlens=torch.tensor([0, 4]))
