"""What the kernel tests share: the device they run on, the relative error they measure and the
tolerances of the norm kernels (gated_norm, qk_norm_rope)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 relative error; bf16 forward output; bf16 gradients against fp32 autograd (see the tests)
FP32_TOL, BF16_FWD_TOL, BF16_GRAD_TOL = 1e-5, 1e-3, 1e-2
# a fused kernel's bf16 error may be at most this times the unfused bf16 path's
ACCURACY_FACTOR = 1.5
EPS = 1e-6


def rel_err(a, b):
    """||a - b|| / ||b|| in fp64 (an all-zero b divides by 1e-30: 0 when a is zero too, e.g. the
    gradient of an expert without tokens)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_grads_match(names, grads, ref_grads, true_grads, dtype):
    """A kernel's gradients against fp32 autograd (true_grads): written everywhere; fp32 within
    FP32_TOL; bf16 within BF16_GRAD_TOL and no worse than ACCURACY_FACTOR times the error of the
    unfused bf16 path's gradients (ref_grads)."""
    for name, g, g_ref, g_true in zip(names, grads, ref_grads, true_grads):
        assert torch.isfinite(g).all(), f"{name}: unwritten (NaN) elements"
        if dtype == torch.float32:
            assert rel_err(g, g_true) < FP32_TOL, (name, rel_err(g, g_true))
        else:
            err, ref_err = rel_err(g, g_true), rel_err(g_ref, g_true)
            assert err < BF16_GRAD_TOL and err <= ACCURACY_FACTOR * ref_err, (name, err, ref_err)
