"""The padded MoE permutation against megatron-core's permute/unpermute and the PyTorch reference.

align 1 is megatron's permute: rows, order and permuted probs equal to the bit; unpermute sums in
fp32 where megatron's unweighted unpermute sums in the rows' dtype, so bf16 results agree to a
bf16 step (fp32 ones to round-off). Padded layouts are compared with reference.py exactly, and
gradients (tokens, probs) with the reference's autograd. Kernel outputs are allocated through a
poisoned torch.empty (NaN / -777), so anything a kernel fails to write fails the test. Without a
GPU the kernels run in Triton's interpreter at small shapes; the `gpu` tests run Ring-mini shapes.
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import permute as megatron_permute
from megatron.core.transformer.moe.moe_utils import unpermute as megatron_unpermute

import kernels.moe_permute as moe_permute
from kernels.moe_permute import reference
from kernels.moe_permute.triton_ops import permute_triton, unpermute_triton
from tests.kernels.kernel_testing import DEVICE, rel_err


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty / empty_like that return NaN (floats) or -777 (integers)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -777)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def routing(T, E, k, seed, empty_expert=None, unrouted_tokens=0, device=DEVICE):
    """A routing map with exactly k experts per token (no ties), probs on the chosen experts."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    if empty_expert is not None:
        scores[:, empty_expert] = -1.0
    idx = scores.topk(k, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    routing_map[:unrouted_tokens] = False  # e.g. tokens whose experts live on another EP rank
    probs = torch.rand(T, E, generator=g) * routing_map
    return routing_map.to(device), probs.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unpadded_permute_is_megatrons(poisoned_empty, dtype):
    T, E, k, d = 45, 8, 3, 24
    routing_map, probs = routing(T, E, k, seed=1, empty_expert=5, unrouted_tokens=3)
    x = torch.randn(T, d, device=DEVICE).to(dtype)
    out, out_probs, plan = permute_triton(x, routing_map, probs, max_experts_per_token=k)
    ref, ref_probs, sorted_indices = megatron_permute(x, routing_map, probs=probs)
    assert torch.equal(out, ref)
    assert torch.equal(out_probs, ref_probs)
    assert torch.equal(plan.row_map.long(), sorted_indices)
    assert torch.equal(plan.tokens_per_expert, routing_map.sum(0).int())
    y = torch.randn_like(out)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for weights in (None, probs):
        got = unpermute_triton(y, plan, weights)
        want = megatron_unpermute(y, sorted_indices, x.shape, probs=weights,
                                  routing_map=routing_map)
        assert got.dtype == want.dtype == dtype
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("align", [1, 4, 16])
def test_padded_permute_matches_reference(poisoned_empty, align):
    T, E, k, d = 37, 8, 3, 40
    routing_map, probs = routing(T, E, k, seed=2, empty_expert=2, unrouted_tokens=2)
    x = torch.randn(T, d, device=DEVICE)
    out, out_probs, plan = permute_triton(x, routing_map, probs, max_experts_per_token=k,
                                          align=align)
    ref, ref_probs, ref_plan = reference.permute(x, routing_map, probs, max_experts_per_token=k,
                                                 align=align)
    for name in ("dest", "slot_expert", "row_map", "tokens_per_expert", "counts", "starts"):
        assert torch.equal(getattr(plan, name), getattr(ref_plan, name)), name
    assert torch.equal(out, ref) and torch.equal(out_probs, ref_probs)
    counts = routing_map.sum(0).int()
    assert (plan.tokens_per_expert % align == 0).all()
    padding_per_expert = plan.tokens_per_expert - counts
    assert ((padding_per_expert >= 0) & (padding_per_expert < align)).all()
    padding = plan.row_map < 0
    assert int(padding.sum()) == int((plan.tokens_per_expert - counts).sum())
    assert (out[padding] == 0).all() and (out_probs[padding] == 0).all()
    y = torch.randn_like(out)
    for weights in (None, probs):
        assert rel_err(unpermute_triton(y, plan, weights),
                       reference.unpermute(y, ref_plan, weights)) < 1e-6


def test_extra_rows_are_zero_padding(poisoned_empty):
    T, E, k, d = 20, 4, 2, 16
    routing_map, probs = routing(T, E, k, seed=3)
    x = torch.randn(T, d, device=DEVICE)
    bound = T * k + E * (8 - 1)  # never too small: no host read-back
    out, out_probs, plan = permute_triton(x, routing_map, probs, max_experts_per_token=k,
                                          align=8, num_out_rows=bound)
    ref, ref_probs, ref_plan = reference.permute(x, routing_map, probs, max_experts_per_token=k,
                                                 align=8, num_out_rows=bound)
    assert out.shape[0] == bound
    assert torch.equal(out, ref) and torch.equal(out_probs, ref_probs)
    assert torch.equal(plan.row_map, ref_plan.row_map)
    assert (plan.row_map[int(plan.starts[-1]):] == -1).all()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_gradients_match_reference(weighted):
    T, E, k, d = 33, 8, 3, 24
    routing_map, probs = routing(T, E, k, seed=4, empty_expert=0, unrouted_tokens=1)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(T, d, generator=g, device=DEVICE)
    d_out = torch.randn(T, d, generator=g, device=DEVICE)
    results = []
    for permute, unpermute in ((permute_triton, unpermute_triton),
                               (reference.permute, reference.unpermute)):
        xl, pl = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
        out, out_probs, plan = permute(xl, routing_map, pl, max_experts_per_token=k, align=4)
        rows = torch.arange(out.shape[0], device=DEVICE, dtype=torch.float32)[:, None]
        y = torch.tanh(out) * (1 + 0.01 * rows)  # a per-row function, like an expert
        combined = unpermute(y, plan, pl if weighted else None)
        loss = (combined * d_out).sum() + (out_probs * rows[:, 0]).sum()
        loss.backward()
        results.append((xl.grad, pl.grad))
    (gx, gp), (rx, rp) = results
    assert rel_err(gx, rx) < 1e-6
    assert rel_err(gp, rp) < 1e-6


def test_too_many_experts_per_token_is_an_error():
    routing_map, probs = routing(8, 4, 3, seed=6)
    with pytest.raises(ValueError, match="max_experts_per_token=2"):
        permute_triton(torch.zeros(8, 16, device=DEVICE), routing_map, probs,
                       max_experts_per_token=2)


def test_dispatch_runs_triton_on_cuda_or_under_the_interpreter(monkeypatch):
    calls = []
    import kernels.moe_permute.triton_ops as ops

    real = ops.permute_triton
    monkeypatch.setattr(ops, "permute_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    routing_map, probs = routing(6, 4, 2, seed=7)
    moe_permute.permute(torch.zeros(6, 8, device=DEVICE), routing_map, max_experts_per_token=2)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("align", [1, 16, 128])
def test_ring_mini_shapes_match_reference_on_gpu(poisoned_empty, align):
    T, E, k, d = 8192, 256, 8, 2048
    routing_map, probs = routing(T, E, k, seed=8)
    g = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(T, d, generator=g, device="cuda").bfloat16()
    out, out_probs, plan = permute_triton(x, routing_map, probs, max_experts_per_token=k,
                                          align=align)
    ref, ref_probs, ref_plan = reference.permute(x, routing_map, probs, max_experts_per_token=k,
                                                 align=align)
    assert torch.equal(out, ref) and torch.equal(out_probs, ref_probs)
    assert torch.equal(plan.row_map, ref_plan.row_map)
    y = torch.randn(out.shape, generator=g, device="cuda").bfloat16()
    assert rel_err(unpermute_triton(y, plan, probs), reference.unpermute(y, ref_plan, probs)) < 1e-3
