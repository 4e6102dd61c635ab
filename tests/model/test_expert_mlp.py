"""The routed experts' MLP (ring_train/model/expert_mlp.py) against plain autograd; what it saves.

On CPU the GEMMs run the per-expert loop (bf16 path) or the FP8 emulation with the Triton
quantisers in the interpreter, at small shapes (d != 2F, so that x and h differ in size; an expert
without tokens; group sizes not multiples of 16). The FP8 path is compared with a fake-quantised
reference written from the reference quantisers (tight), and with the exact MLP: e4m3 keeps 3
mantissa bits (relative rounding error up to 2^-4 per element), and two chained quantised GEMMs
leave ~6% relative error on random data, hence FP8_TOL. The `gpu` tests run Ring-mini shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.fp8 import grouped as fp8g
from kernels.fp8 import grouped_reference as R
from kernels.fp8.linear import WEIGHT_CACHE
from ring_train.model import expert_mlp as M
from ring_train.model.expert_mlp import expert_mlp
from tests.kernels.kernel_testing import DEVICE

COUNTS = [20, 0, 45, 31]
D, FF = 48, 32  # hidden, moe_intermediate_size (2F = 64 != d)
FP8_TOL = 0.1


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_leaves(counts=COUNTS, d=D, f=FF, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    T, E = sum(counts), len(counts)
    x = torch.randn(T, d, generator=g, device=device)
    probs = torch.rand(T, generator=g, device=device)
    w1 = torch.randn(E, 2 * f, d, generator=g, device=device) / d ** 0.5
    w2 = torch.randn(E, d, f, generator=g, device=device) / f ** 0.5
    dy = torch.randn(T, d, generator=g, device=device)
    leaves = [x.to(dtype), probs, w1.to(dtype), w2.to(dtype)]
    return [t.requires_grad_() for t in leaves], dy.to(dtype)


def fresh(leaves):
    return [t.detach().clone().requires_grad_() for t in leaves]


def outputs_and_grads(fn, leaves, dy):
    leaves = fresh(leaves)
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def reference_mlp(x, probs, w1, w2, counts=COUNTS):
    """Plain autograd, expert by expert, with megatron's activation-with-probs formula."""
    out, start = [], 0
    for e, n in enumerate(counts):
        h = x[start:start + n] @ w1[e].t()
        gate, up = torch.chunk(h, 2, dim=-1)
        a = (F.silu(gate) * up * probs[start:start + n, None]).to(h.dtype)
        out.append(a @ w2[e].t())
        start += n
    return torch.cat(out)


def ours(fp8=None, recompute=False, counts=COUNTS):
    tpe = torch.tensor(counts, device=DEVICE)
    return lambda x, p, w1, w2: expert_mlp(x, p, w1, w2, tpe, fp8, recompute)


# -- bf16 path (here in fp32: the loop path) ----------------------------------------------------

@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_path_matches_plain_autograd_loop_in_fp32(recompute):
    leaves, dy = make_leaves()
    got = outputs_and_grads(ours(None, recompute), leaves, dy)
    want = outputs_and_grads(reference_mlp, leaves, dy)
    for name, a, b in zip(("y", "dx", "dprobs", "dw1", "dw2"), got, want):
        assert rel(a, b) < 1e-5, name
    assert (got[3][1] == 0).all() and (got[4][1] == 0).all()  # the expert without tokens


@pytest.mark.parametrize("fp8", [None, "rowwise"])
def test_recompute_gives_bitwise_identical_results(fp8):
    leaves, dy = make_leaves(seed=1)
    a = outputs_and_grads(ours(fp8, False), leaves, dy)
    b = outputs_and_grads(ours(fp8, True), leaves, dy)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_probs_scale_the_activation_output_as_megatron():
    from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

    g = torch.Generator().manual_seed(7)
    h = torch.randn(40, 2 * FF, generator=g)
    probs = torch.rand(40, generator=g)
    want = weighted_bias_swiglu_impl(h, None, probs[:, None])
    torch.testing.assert_close(R.swiglu_reference(h, probs), want, rtol=1e-6, atol=1e-6)
    # bf16: megatron rounds silu(gate) and silu(gate) * up to bf16 before the fp32 multiply and
    # rounds the product; we round once. Four bf16 roundings (unit roundoff 2^-8) at most apart.
    hb = h.bfloat16()
    torch.testing.assert_close(R.swiglu_reference(hb, probs).float(),
                               weighted_bias_swiglu_impl(hb, None, probs[:, None]).float(),
                               rtol=4 * 2 ** -8, atol=1e-6)


def test_zero_rows_give_empty_outputs_and_zero_weight_grads():
    for fp8 in (None, "rowwise"):
        leaves, _ = make_leaves(counts=[0, 0, 0])
        y = ours(fp8, True, counts=[0, 0, 0])(*leaves)
        assert y.shape == (0, D)
        y.sum().backward()
        assert (leaves[2].grad == 0).all() and (leaves[3].grad == 0).all()


def test_swiglu_fallback_matches_kernels_swiglu(monkeypatch):
    pytest.importorskip("kernels.swiglu")
    leaves, dy = make_leaves(seed=2)
    with_kernels = outputs_and_grads(ours(None, False), leaves, dy)
    monkeypatch.setattr(M, "_swiglu_impl", lambda: (R.swiglu_reference,
                                                    R.swiglu_backward_reference, "reference"))
    fallback = outputs_and_grads(ours(None, False), leaves, dy)
    for a, b in zip(with_kernels, fallback):
        assert rel(a, b) < 1e-6


def test_rejects_unknown_recipes_and_shapes():
    leaves, _ = make_leaves()
    x, p, w1, w2 = leaves
    tpe = torch.tensor(COUNTS)
    with pytest.raises(ValueError, match="fp8 must be"):
        expert_mlp(x, p, w1, w2, tpe, "mxfp8")
    with pytest.raises(ValueError, match="expected w1"):
        expert_mlp(x, p, w1, w2[:, :, :-1], tpe)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        expert_mlp(x, p, w1, w2, tpe[:-1])


# -- FP8 path -------------------------------------------------------------------------------------

def fake_quant_mlp(leaves, dy, counts=COUNTS):
    """Forward and gradients of the FP8 expert MLP written from the reference quantisers and the
    emulated GEMMs, operand by operand: (y, dx, dprobs, dw1, dw2)."""
    x, probs, w1, w2 = (t.detach() for t in leaves)
    dt = x.dtype
    qr, qw, qc = (R.quantize_rows_reference, R.quantize_expert_weight_reference,
                  R.quantize_group_columns_reference)
    h = R.grouped_mm_reference(qr(x), qw(w1), counts, dt)
    a = R.swiglu_reference(h, probs)
    y = R.grouped_mm_reference(qr(a), qw(w2), counts, dt)
    dw2 = R.grouped_wgrad_reference(qc(dy, counts), qc(a, counts), dt)
    da = R.grouped_mm_reference(qr(dy), qw(w2, transpose=True), counts, dt)
    dh, dprobs = R.swiglu_backward_reference(da, h, probs)
    dw1 = R.grouped_wgrad_reference(qc(dh, counts), qc(x, counts), dt)
    dx = R.grouped_mm_reference(qr(dh), qw(w1, transpose=True), counts, dt)
    return [y, dx, dprobs, dw1, dw2]


@pytest.mark.parametrize("recompute", [False, True])
def test_fp8_path_matches_fake_quantised_reference(recompute):
    leaves, dy = make_leaves(seed=3)
    got = outputs_and_grads(ours("rowwise", recompute), leaves, dy)
    want = fake_quant_mlp(leaves, dy)
    for name, a, b in zip(("y", "dx", "dprobs", "dw1", "dw2"), got, want):
        assert rel(a, b) < 1e-4, name


def test_fp8_path_approximates_the_exact_mlp():
    leaves, dy = make_leaves(seed=4)
    got = outputs_and_grads(ours("rowwise", False), leaves, dy)
    want = outputs_and_grads(reference_mlp, leaves, dy)
    for name, a, b in zip(("y", "dx", "dprobs", "dw1", "dw2"), got, want):
        assert rel(a, b) < FP8_TOL, name


def saved_by_forward(fn, leaves):
    """(output, [(shape, bytes)] of what the forward saves for backward, weights excluded)."""
    weights = {leaves[2].data_ptr(), leaves[3].data_ptr()}
    saved = []

    def pack(t):
        if t.data_ptr() not in weights:
            saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*leaves)
    return y, saved


@pytest.mark.parametrize("fp8", [None, "rowwise"])
def test_recompute_saves_neither_h_nor_a(fp8):
    leaves, _ = make_leaves(seed=5)
    T, E = sum(COUNTS), len(COUNTS)
    _, kept = saved_by_forward(ours(fp8, False), leaves)
    _, dropped = saved_by_forward(ours(fp8, True), leaves)
    assert (T, 2 * FF) in [s for s, _ in kept]  # h, without recompute
    assert all(s not in ((T, 2 * FF), (T, FF)) for s, _ in dropped)
    saved_h = T * 2 * FF * 4  # fp32 here
    if fp8 is None:
        assert sum(b for _, b in kept) - sum(b for _, b in dropped) == saved_h
    else:  # recompute keeps x's rows form (data + one fp32 scale per row) instead of h
        assert (sum(b for _, b in kept) - sum(b for _, b in dropped)
                == saved_h - (T * D + T * 4))
        assert all(s not in ((T, FF), (FF, R.padded_capacity(T, E))) for s, _ in kept)


@pytest.mark.parametrize("recompute", [False, True])
def test_fp8_passes_emit_one_form_of_the_activation_each(monkeypatch, recompute):
    calls = []
    for name in ("quantize_swiglu_rows", "quantize_swiglu_columns"):
        real = getattr(fp8g, name)
        monkeypatch.setattr(fp8g, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    leaves, dy = make_leaves(seed=6)
    y = ours("rowwise", recompute)(*leaves)
    assert calls == ["quantize_swiglu_rows"]  # forward: fc2's operand only
    calls.clear()
    y.backward(dy)
    assert calls == ["quantize_swiglu_columns"]  # backward: fc2's weight-gradient operand only


def test_fp8_expert_weights_are_quantised_once_per_optimizer_step(monkeypatch):
    calls = []
    real = fp8g.quantize_expert_weight
    monkeypatch.setattr(fp8g, "quantize_expert_weight",
                        lambda w, transpose=False: calls.append(transpose) or real(w, transpose))
    WEIGHT_CACHE.invalidate()
    leaves, dy = make_leaves(seed=7)
    mlp = ours("rowwise", recompute=True)
    for _ in range(2):  # two micro-batches of one step, fc1 recomputed in each backward
        mlp(*leaves).backward(dy)
    # w1, w2 (forward) and their transposes (backward), once each
    assert sorted(calls) == [False, False, True, True]
    with torch.no_grad():  # an optimizer step: in place, through the tensor (bumps _version)
        leaves[2].mul_(0.5)
    y = mlp(*leaves)
    y.backward(dy)
    assert sorted(calls) == [False, False, False, True, True, True]  # only w1 is re-quantised
    WEIGHT_CACHE.invalidate()
    assert torch.equal(y, mlp(*leaves))  # the cached forms were the new w1's


# -- GPU: Ring-mini shapes ---------------------------------------------------------------------

RING_MINI = dict(T=65536, d=2048, F=512)


def ring_mini_counts(E, seed=0, align=16):
    """Balanced-ish random group sizes (multiples of `align`) summing to T, two experts empty."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=g) + 0.5
    w[[1, E // 2]] = 0.0
    units = RING_MINI["T"] // align
    c = torch.floor(w / w.sum() * units).long()
    c[0] += units - int(c.sum())
    return (c * align).tolist()


def ring_mini_leaves(E, dtype=torch.bfloat16):
    counts = ring_mini_counts(E, seed=E)
    leaves, dy = make_leaves(counts, RING_MINI["d"], RING_MINI["F"], dtype=dtype, seed=E)
    return counts, leaves, dy


@pytest.mark.gpu
@pytest.mark.parametrize("E", [256, 32])
def test_gpu_bf16_grouped_matches_fp32_loop_at_ring_mini_shapes(E):
    counts, leaves, dy = ring_mini_leaves(E)
    got = outputs_and_grads(ours(None, False, counts), leaves, dy)
    ref_leaves = [t.detach().float() for t in leaves]
    want = outputs_and_grads(lambda *a: reference_mlp(*a, counts=counts), ref_leaves, dy.float())
    for name, a, b in zip(("y", "dx", "dprobs", "dw1", "dw2"), got, want):
        assert rel(a, b) < 2e-2, name
    empty = [e for e, n in enumerate(counts) if n == 0]
    assert (got[3][empty] == 0).all() and (got[4][empty] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("E", [256, 32])
def test_gpu_fp8_matches_emulation_and_approximates_bf16_at_ring_mini_shapes(E):
    counts, leaves, dy = ring_mini_leaves(E)
    got = outputs_and_grads(ours("rowwise", False, counts), leaves, dy)
    with fp8g.use_backend("emulated"):
        emulated = outputs_and_grads(ours("rowwise", False, counts), leaves, dy)
    bf16 = outputs_and_grads(ours(None, False, counts), leaves, dy)
    for name, a, b, c in zip(("y", "dx", "dprobs", "dw1", "dw2"), got, emulated, bf16):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-2, name
        assert rel(a, c) < FP8_TOL, name
    empty = [e for e, n in enumerate(counts) if n == 0]
    assert (got[3][empty] == 0).all() and (got[4][empty] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [None, "rowwise"])
def test_gpu_recompute_matches_no_recompute_and_saves_h(fp8):
    E = 256
    counts, leaves, dy = ring_mini_leaves(E)
    a = outputs_and_grads(ours(fp8, False, counts), leaves, dy)
    b = outputs_and_grads(ours(fp8, True, counts), leaves, dy)
    for x, y in zip(a, b):
        assert rel(x, y) < 1e-6
    T, d, F = RING_MINI["T"], RING_MINI["d"], RING_MINI["F"]
    _, kept = saved_by_forward(ours(fp8, False, counts), leaves)
    _, dropped = saved_by_forward(ours(fp8, True, counts), leaves)
    per_row = lambda saved: sum(b for _, b in saved) / T  # noqa: E731
    cols = (d * R.padded_capacity(T, E) + 4 * E * d) / T  # x's columns form and its scales
    if fp8 is None:
        expect = (2 * d + 4 * F + 4, 2 * d + 4)
    else:
        expect = (cols + 4 * F + 4, cols + d + 8)
    assert per_row(kept) == pytest.approx(expect[0], abs=16)
    assert per_row(dropped) == pytest.approx(expect[1], abs=16)
