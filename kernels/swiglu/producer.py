"""Fused producer kernels (SwiGLU, RMSNorm): what they emit, their output buffers, the backend.

A producer computes one high-precision tensor out [R, K] and can emit, from the same read of its
inputs, any of
  "out"      out itself, in its dtype (bf16 for bf16 inputs);
  "rows"     out quantised block1x128 along K: Fp8Tensor data [R, K], scale [R, ceil(K/128)];
  "columns"  out^T quantised block1x128 along R: Fp8Tensor data [K, R], scale [K, ceil(R/128)]
             (feeds a weight-gradient GEMM, which contracts over tokens).
Both FP8 forms quantise the value `out` holds after rounding to its dtype, so they equal the
quantisation of the emitted "out" tensor. Format rules: kernels/fp8/tensor.py.

Shared by kernels/swiglu and kernels/rmsnorm (it would sit naturally in kernels/fp8/). Host side
only: nothing here imports Triton. The dispatch test (`use_triton`, `interpreting`) is
kernels/triton_support.py's, re-exported here.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor

from kernels.fp8.tensor import FP8_DTYPE, Fp8Tensor, empty_scale
from kernels.triton_support import interpreting, use_triton  # noqa: F401 (re-exported)

EMITS = ("out", "rows", "columns")


class Emitted(NamedTuple):
    """The forms a producer emitted; None for those not asked for."""
    out: Optional[Tensor]
    rows: Optional[Fp8Tensor]
    columns: Optional[Fp8Tensor]


def parse_emit(emit: Iterable[str]) -> frozenset:
    """The set of forms asked for; raises on unknown names or an empty request."""
    wanted = frozenset((emit,) if isinstance(emit, str) else emit)
    if not wanted or not wanted <= set(EMITS):
        raise ValueError(f"emit must be a non-empty subset of {EMITS}, got {sorted(wanted)}")
    return wanted


def empty_block1x128(R: int, K: int, device: torch.device) -> Fp8Tensor:
    """Unwritten block1x128 Fp8Tensor for data [R, K]: scale [R, ceil(K/128)] with strides (1, R)
    (K-block-major, the layout cuBLAS's blockwise GEMM reads)."""
    data = torch.empty(R, K, dtype=FP8_DTYPE, device=device)
    return Fp8Tensor(data, empty_scale("block1x128", R, K, device), "block1x128")


def fp8_launch_args(t: Optional[Fp8Tensor], dummy: Tensor) -> tuple:
    """(data, scale, data row stride, scale strides) of t for a kernel launch, or placeholders
    (never dereferenced: the kernel's matching EMIT flag is off)."""
    if t is None:
        return dummy, dummy, 0, 0, 0
    return t.data, t.scale, t.data.stride(0), t.scale.stride(0), t.scale.stride(1)
