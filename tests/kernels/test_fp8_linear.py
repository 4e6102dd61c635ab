"""fp8_linear forward and backward against an fp32 linear, what it saves for backward, and the
weight cache's reuse and invalidation.

Tolerance FP8_TOL = 0.042 relative (Frobenius) error for the output and both gradients on random
normal data: each of the three GEMMs multiplies two e4m3-rounded operands, 0.0375 expected
(derivation: test_fp8_gemm.py); measured 0.036-0.038 for every recipe, bf16 and fp32 inputs.
"""

import pytest
import torch

from kernels.fp8.gemm import fp8_gemm
from kernels.fp8.linear import RECIPES, DelayedScaling, Fp8WeightCache, fp8_linear
from kernels.fp8.quantize import transpose_fp8
from kernels.fp8.reference import quantize_rows_reference
from tests.kernels.kernel_testing import DEVICE, rel_err

FP8_TOL = 0.042


def make(B, T, K, N, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, T, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device)
    dy = torch.randn(B, T, N, generator=g).to(device)
    return x, w, dy


def fp32_linear(x, w, dy):
    xr = x.detach().float().clone().requires_grad_(True)
    wr = w.detach().float().clone().requires_grad_(True)
    y = xr @ wr.t()
    y.backward(dy.float())
    return y.detach(), xr.grad, wr.grad


def linear(x, w, recipe, cache=None):
    """fp8_linear as a layer's first call: delayed recipes with a fresh history (whose first
    quantisations are current-scaled, so every recipe meets the same tolerances here)."""
    return fp8_linear(x, w, recipe, cache, DelayedScaling.for_recipe(recipe))


def run_fp8(x, w, dy, recipe, dtype, cache=None):
    xx = x.detach().to(dtype, copy=True).requires_grad_(True)
    ww = w.detach().to(dtype, copy=True).requires_grad_(True)
    y = linear(xx, ww, recipe, cache)
    y.backward(dy.to(dtype))
    return y.detach(), xx.grad, ww.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_forward_and_gradients_match_fp32_linear(recipe, dtype):
    x, w, dy = make(2, 136, 272, 144)  # M = 272 tokens, K = 272, N = 144: partial blocks
    ref = fp32_linear(x.to(dtype), w.to(dtype), dy.to(dtype))
    out = run_fp8(x, w, dy, recipe, dtype)
    for name, o, r in zip(("y", "dx", "dw"), out, ref):
        assert o.dtype == dtype and o.shape == r.shape, name
        err = rel_err(o, r)
        assert err < FP8_TOL, f"{recipe} {dtype} {name}: {err}"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_saves_only_fp8_tensors_for_backward(recipe):
    x, w, _ = make(1, 256, 256, 128)
    x = x.bfloat16().requires_grad_(True)
    w = w.bfloat16().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear(x, w, recipe)
    data = [t for t in saved if t.dtype == torch.float8_e4m3fn]
    assert len(data) == 2 and {tuple(t.shape) for t in data} == {(256, 256), (256, 128)}
    # Besides FP8 data only fp32 scales, each far smaller than x.
    assert all(t.dtype == torch.float32 and t.numel() <= 256 * 2 for t in saved
               if t.dtype != torch.float8_e4m3fn)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_partial_requires_grad_and_no_grad(recipe):
    x, w, dy = make(1, 128, 256, 128)
    x, w, dy = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    ref_y, ref_dx, ref_dw = run_fp8(x, w, dy, recipe, torch.bfloat16)
    xx = x.clone().requires_grad_(True)
    linear(xx, w, recipe).backward(dy)  # frozen weight
    assert torch.equal(xx.grad, ref_dx)
    ww = w.clone().requires_grad_(True)
    linear(x, ww, recipe).backward(dy)  # input without grad
    assert torch.equal(ww.grad, ref_dw)
    with torch.no_grad():
        assert torch.equal(linear(x, ww, recipe), ref_y)


def test_rejects_unknown_recipes_and_shapes():
    x, w, _ = make(1, 16, 32, 16)
    with pytest.raises(ValueError, match="recipe"):
        fp8_linear(x, w, "mxfp8")
    with pytest.raises(ValueError, match="weight"):
        fp8_linear(x, w.t(), "tensorwise")


def test_delayed_recipes_need_their_scaling_state_and_others_refuse_it():
    x, w, _ = make(1, 16, 32, 16)
    with pytest.raises(ValueError, match="DelayedScaling.for_recipe"):
        fp8_linear(x, w, "tensorwise_delayed")
    with pytest.raises(ValueError, match="does not scale with delay"):
        fp8_linear(x, w, "tensorwise", delayed=DelayedScaling())
    assert DelayedScaling.for_recipe("blockwise") is None


# --------------------------------------------------------------------------------------------
# Delayed scaling.

def test_delayed_scaling_takes_scales_from_the_layers_previous_amaxes():
    """Four steps of one layer whose input and output gradient grow 8x at step 2 and shrink back:
    each step's x and dy are scaled from the largest amax of the previous two (the first step's
    from its own), so step 2 saturates and step 3 still uses step 2's large amax. y and dx equal
    the FP8 GEMMs of operands quantised with exactly those amaxes."""
    length = 2
    delayed = DelayedScaling(length)
    torch.manual_seed(0)
    w = (torch.randn(96, 160) * 160 ** -0.5).bfloat16().requires_grad_(True)
    wq = quantize_rows_reference(w.detach(), "tensor")
    amaxes = {"x": [], "dy": []}

    def expected_amax(name, own):
        seen = amaxes[name]
        amax = own if not seen else torch.stack(seen[-length:]).max()
        seen.append(own)
        return amax

    for step, gain in enumerate([1.0, 1.0, 8.0, 1.0]):
        x = (torch.randn(2, 64, 160) * gain).bfloat16().requires_grad_(True)
        dy = (torch.randn(2, 64, 96) * gain).bfloat16()
        y = fp8_linear(x, w, "tensorwise_delayed", delayed=delayed)
        y.backward(dy)
        x2, dy2 = x.detach().reshape(-1, 160), dy.reshape(-1, 96)
        xq = quantize_rows_reference(x2, "tensor", expected_amax("x", x2.float().abs().max()))
        dyq = quantize_rows_reference(dy2, "tensor", expected_amax("dy", dy2.float().abs().max()))
        assert torch.equal(y.detach().reshape(-1, 96), fp8_gemm(xq, wq, out_dtype=torch.bfloat16))
        assert torch.equal(x.grad.reshape(-1, 160),
                           fp8_gemm(dyq, transpose_fp8(wq), out_dtype=torch.bfloat16))
        saturated = xq.data.float().abs().eq(448).float().mean().item()
        assert (saturated > 0.01) == (step == 2), (step, saturated)
        w.grad = None
    assert delayed.input.recorded == delayed.grad.recorded == 4


# --------------------------------------------------------------------------------------------
# The weight cache.

@pytest.mark.parametrize("recipe", list(RECIPES))
def test_cache_reuses_the_weight_across_micro_batches(recipe):
    x, w, dy = make(2, 128, 256, 128)
    x, w, dy = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    cache = Fp8WeightCache()
    weight = torch.nn.Parameter(w.clone())
    grads = []
    for xb, dyb in zip(x, dy):  # two micro-batches, gradient accumulation
        linear(xb.clone().requires_grad_(True), weight, recipe, cache).backward(dyb)
        grads.append(weight.grad.clone())
    assert cache.misses == 1 and cache.hits == 1 and len(cache) == 1
    fresh = torch.nn.Parameter(w.clone())
    for xb, dyb in zip(x, dy):
        linear(xb, fresh, recipe).backward(dyb)
    assert torch.equal(fresh.grad, grads[-1])


def test_cache_invalidates_on_inplace_updates_and_optimizer_steps():
    x, w, dy = make(1, 128, 256, 128)
    x = x.bfloat16()
    cache = Fp8WeightCache()
    weight = torch.nn.Parameter(w.bfloat16())
    y0 = fp8_linear(x, weight, "blockwise", cache)
    assert cache.misses == 1
    with torch.no_grad():
        weight.mul_(2)  # bumps weight._version
    y1 = fp8_linear(x, weight, "blockwise", cache)
    assert cache.misses == 2
    assert rel_err(y1, 2 * y0) < 1e-2
    weight.grad = torch.ones_like(weight)
    torch.optim.SGD([weight], lr=0.5).step()
    fp8_linear(x, weight, "blockwise", cache)
    assert cache.misses == 3
    y3 = fp8_linear(x, weight, "blockwise", cache)
    assert cache.hits == 1
    assert torch.equal(y3, fp8_linear(x, weight, "blockwise"))


def test_cache_needs_invalidate_after_data_writes():
    """`w.data.add_()` (and megatron's param-buffer copies) bypass weight._version: the cache
    cannot see them, and serves stale weights until invalidate()."""
    x, w, _ = make(1, 128, 256, 128)
    x = x.bfloat16()
    cache = Fp8WeightCache()
    weight = torch.nn.Parameter(w.bfloat16())
    y0 = fp8_linear(x, weight, "tensorwise", cache)
    weight.data.add_(1.0)
    assert torch.equal(fp8_linear(x, weight, "tensorwise", cache), y0)  # stale, by design
    cache.invalidate()
    y1 = fp8_linear(x, weight, "tensorwise", cache)
    assert torch.equal(y1, fp8_linear(x, weight, "tensorwise"))
    assert not torch.equal(y1, y0)


def test_cache_keys_recipes_and_tensor_identity():
    x, w, _ = make(1, 128, 256, 128)
    x = x.bfloat16()
    cache = Fp8WeightCache()
    weight = w.bfloat16()
    for recipe in RECIPES:
        linear(x, weight, recipe, cache)
    # Entries are per weight scaling: the two tensorwise recipes share theirs.
    assert len(cache) == 3 and cache.misses == 3 and cache.hits == 1
    # A different tensor object with the same storage (a view) is not trusted.
    fp8_linear(x, weight.view_as(weight), "blockwise", cache)
    assert cache.misses == 4


def test_cache_drops_entries_of_freed_weights():
    x, w, _ = make(1, 128, 256, 128)
    cache = Fp8WeightCache()
    weight = w.bfloat16()
    fp8_linear(x.bfloat16(), weight, "blockwise", cache)
    assert len(cache) == 1
    del weight
    assert len(cache) == 0


def test_cache_adds_the_transposed_weight_on_first_need():
    x, w, dy = make(1, 128, 256, 128)
    x, dy = x.bfloat16(), dy.bfloat16()
    cache = Fp8WeightCache()
    weight = torch.nn.Parameter(w.bfloat16())
    for recipe in RECIPES:
        with torch.no_grad():
            linear(x, weight, recipe, cache)  # forward only: no transposed weight
        xx = x.clone().requires_grad_(True)
        linear(xx, weight, recipe, cache).backward(dy)
        xr = x.clone().requires_grad_(True)
        linear(xr, weight.detach(), recipe).backward(dy)
        assert torch.equal(xx.grad, xr.grad), recipe
    assert cache.misses == 3 and cache.hits == 5


# --------------------------------------------------------------------------------------------
# GPU: real shapes.

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 2048, 2048, 1536), (1, 4001, 2048, 1536)])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_gpu_linear_matches_fp32_at_real_shapes(recipe, shape):
    B, T, K, N = shape
    x, w, dy = make(B, T, K, N, device="cuda", seed=T)
    ref = fp32_linear(x.bfloat16(), w.bfloat16(), dy.bfloat16())
    out = run_fp8(x, w, dy, recipe, torch.bfloat16, cache=Fp8WeightCache())
    for name, o, r in zip(("y", "dx", "dw"), out, ref):
        err = rel_err(o, r)
        print(f"{recipe} {shape} {name}: rel err {err:.4f}")
        assert err < FP8_TOL, f"{recipe} {shape} {name}: {err}"
