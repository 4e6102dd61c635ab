"""fp8_linear_pair against the chain fp8_linear(fp8_linear(x, w1), w2) it fuses (same recipe, same
per-layer DelayedScaling) and against fp32; its partial-gradient and no-grad paths; its errors.

On CPU the pair's epilogue GEMMs run in Triton's interpreter (32-wide tiles), the chain's GEMMs in
the PyTorch reference: the two products differ only by fp32 accumulation order, so outputs and
gradients agree to 1e-3 relative (an FP8 rounding flip of a few elements), and the recorded amaxes
to 1e-3. FP8_TOL: as tests/kernels/test_fp8_linear.py, one more operand rounding for the product
between the layers.
"""

import pytest
import torch

from benchmarks.common import launch_config
from kernels.fp8 import triton_gemm as TG
from kernels.fp8.linear import DelayedScaling, Fp8WeightCache, fp8_linear
from kernels.fp8.linear_pair import PAIR_RECIPES, fp8_linear_pair
from tests.kernels.kernel_testing import DEVICE, rel_err

RECIPE = "tensorwise_delayed"
CHAIN_TOL = 1e-3
FP8_TOL = 0.055
pytestmark = pytest.mark.usefixtures("small_gemm_tiles")


def make(B, T, K, H, N, device=DEVICE, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, T, K, generator=g)
    w1 = torch.randn(H, K, generator=g) * K ** -0.5
    w2 = torch.randn(N, H, generator=g) * H ** -0.5
    dy = torch.randn(B, T, N, generator=g)
    return [t.to(device, torch.bfloat16) for t in (x, w1, w2, dy)]


def chain(d1, d2):
    return lambda x, w1, w2: fp8_linear(fp8_linear(x, w1, RECIPE, None, d1), w2, RECIPE, None, d2)


def pair(d1, d2, cache=None):
    return lambda x, w1, w2: fp8_linear_pair(x, w1, w2, RECIPE, cache, d1, d2)


def run(fn, x, w1, w2, dy, grads=(True, True, True), steps=3):
    """Per step (dy grows by a factor of 1 + step): y and the gradients asked for."""
    leaves = [t.detach().clone().requires_grad_(g) for t, g in zip((x, w1, w2), grads)]
    out = []
    for step in range(steps):
        y = fn(*leaves)
        y.backward(dy * (1 + step))
        out.append([y.detach()] + [t.grad for t in leaves])
        for t in leaves:
            t.grad = None
    return out


@pytest.mark.parametrize("grads", [(True, True, True), (False, True, True), (True, False, False),
                                   (False, False, True)])
def test_pair_equals_the_chain_of_fp8_linears(grads):
    x, w1, w2, dy = make(2, 48, 96, 160, 80)
    dc, dp = [DelayedScaling(2), DelayedScaling(2)], [DelayedScaling(2), DelayedScaling(2)]
    want = run(chain(*dc), x, w1, w2, dy, grads)
    got = run(pair(*dp, Fp8WeightCache()), x, w1, w2, dy, grads)
    for step, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(("y", "dx", "dw1", "dw2"), g, w):
            assert (a is None) == (b is None), (step, name)
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, (step, name)
                assert rel_err(a, b) < CHAIN_TOL, (step, name, rel_err(a, b))
    for c, p in zip(dc, dp):
        for hc, hp in ((c.input, p.input), (c.grad, p.grad)):
            assert hc.recorded == hp.recorded
            if hc.amaxes is not None:
                assert rel_err(hp.amaxes, hc.amaxes) < CHAIN_TOL


def test_pair_matches_fp32():
    x, w1, w2, dy = make(1, 128, 128, 256, 96, seed=1)
    leaves = [t.float().requires_grad_(True) for t in (x, w1, w2)]
    y = (leaves[0] @ leaves[1].t()) @ leaves[2].t()
    y.backward(dy.float())
    want = [y.detach()] + [t.grad for t in leaves]
    d = [DelayedScaling(), DelayedScaling()]
    got = run(pair(*d), x, w1, w2, dy, steps=1)[0]
    for name, a, b in zip(("y", "dx", "dw1", "dw2"), got, want):
        assert rel_err(a, b) < FP8_TOL, (name, rel_err(a, b))


def test_forward_without_grad_equals_the_forward_with_grad():
    x, w1, w2, dy = make(1, 64, 96, 160, 80)
    d = [DelayedScaling(), DelayedScaling()]
    y = fp8_linear_pair(x, w1.requires_grad_(True), w2, RECIPE, None, *d)
    with torch.no_grad():
        y_no_grad = fp8_linear_pair(x, w1, w2, RECIPE, None, *d)
    assert rel_err(y_no_grad, y.detach()) < CHAIN_TOL
    assert d[0].input.recorded == 2 and d[0].grad.recorded == 0


def test_rejects_other_recipes_missing_state_and_shapes():
    x, w1, w2, _ = make(1, 16, 32, 48, 16)
    d = [DelayedScaling(), DelayedScaling()]
    assert PAIR_RECIPES == (RECIPE,)
    with pytest.raises(ValueError, match="needs delayed scaling"):
        fp8_linear_pair(x, w1, w2, "blockwise", None, *d)
    with pytest.raises(ValueError, match="DelayedScaling"):
        fp8_linear_pair(x, w1, w2, RECIPE, None, d[0], None)
    with pytest.raises(ValueError, match=r"w1 \[H, K\], w2 \[N, H\]"):
        fp8_linear_pair(x, w1, w2.t(), RECIPE, None, *d)


@pytest.mark.gpu
def test_gpu_pair_matches_the_chain_at_a_real_shape():
    """16384 tokens, 2048 -> 8192 -> 2048: the pair (Triton epilogue GEMMs) against the chain
    (cuBLAS and the quantisers) over 3 steps; the GEMMs differ in accumulation order only."""
    with launch_config(TG, **vars(TG.KernelConfig())):  # the default (GPU) tiles
        x, w1, w2, dy = make(1, 16384, 2048, 8192, 2048, device="cuda")
        want = run(chain(DelayedScaling(), DelayedScaling()), x, w1, w2, dy)
        got = run(pair(DelayedScaling(), DelayedScaling(), Fp8WeightCache()), x, w1, w2, dy)
    for step, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(("y", "dx", "dw1", "dw2"), g, w):
            assert rel_err(a, b) < 1e-2, (step, name, rel_err(a, b))
