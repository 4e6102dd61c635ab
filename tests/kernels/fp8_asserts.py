"""Comparing FP8 data produced by kernels with the PyTorch reference quantisers, and catching
elements a kernel fails to write."""

import contextlib

import torch


def assert_fp8_data_match(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    """Equal values, on CPU and GPU (compared as values: Triton's interpreter drops the sign of
    zero). Unwritten memory (NaN) fails."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    differ = got.float() != ref.float()
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} fp8 values differ"


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty returns NaN-filled floating tensors (fp8 NaN is 0x7F) while active."""
    real = torch.empty

    def empty(*size, dtype=None, **kwargs):
        t = real(*size, dtype=dtype, **kwargs)
        if t.dtype == torch.float8_e4m3fn:
            t.view(torch.uint8).fill_(0x7F)
        elif t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real
