"""Comparing FP8 data produced by kernels with the PyTorch reference quantisers."""

import torch

# On GPUs a kernel's fp32 -> e4m3 conversion and torch's may round a rare value differently
# (measured on the H100: 0.02% of values, each one code apart).
GPU_MAX_DIFFERING_FRACTION = 1e-3


def assert_fp8_data_match(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Equal values on CPU (compared as values: Triton's interpreter drops the sign of zero);
    on GPU, values that differ must be adjacent e4m3 codes and rare. Unwritten (NaN) fails."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    differ = got.float() != ref.float()
    if not got.is_cuda:
        assert not differ.any(), f"{what}: {int(differ.sum())} fp8 values differ"
        return
    codes = (got.view(torch.uint8).int() - ref.view(torch.uint8).int()).abs()
    assert (codes[differ] == 1).all(), f"{what}: values differ by more than one e4m3 step"
    fraction = differ.float().mean().item()
    assert fraction <= GPU_MAX_DIFFERING_FRACTION, f"{what}: {fraction:.2e} of fp8 values differ"
