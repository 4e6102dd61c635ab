"""Comparing FP8 data produced by kernels with the PyTorch reference quantisers."""

import torch


def assert_fp8_data_match(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Equal values, on CPU and GPU (compared as values: Triton's interpreter drops the sign of
    zero). Unwritten memory (NaN) fails."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    differ = got.float() != ref.float()
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} fp8 values differ"
