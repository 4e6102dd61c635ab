"""Plain PyTorch ground truth of the FP8 grouped (per-expert) quantisers and GEMMs in grouped.py.

The routed experts' GEMMs run over token rows sorted by expert: group e is rows
[offs[e-1], offs[e]) of a [T, K] operand, offs = cumsum(tokens_per_expert). Their FP8 operands use
rowwise scaling, the only scaling `torch._scaled_grouped_mm` has (torch 2.11), in the format of
tensor.py (decoding scales, scale = max(amax, AMAX_FLOOR) / 448, RTNE cast to e4m3):

  rows form (forward and dgrad A operand) of x [T, K]:  Fp8Tensor "row", data [T, K], scale [T, 1].
  expert weight w [E, N, K] (B operand, contracts K): Fp8Tensor "row" of w.reshape(E*N, K), i.e.
      one scale per (expert, output column); data [E*N, K], scale [E*N, 1]. The dgrad operand is
      the same of w^T [E, K, N] (data [E*K, N]).
  group columns (wgrad operands) of x [T, C]: `GroupColumns`, x^T quantised with one scale per
      (expert, column of x): data [C, T_cap], scale [E, C]. The token axis is *padded*: group e
      occupies columns [poffs[e-1], poffs[e]) with poffs the end offsets of groups rounded up to
      GROUP_ALIGN (and at least GROUP_ALIGN for an empty expert), its first n_e columns the tokens,
      the rest zeros. FP8 `torch._scaled_grouped_mm` with both operands 2-D needs every group along
      the contracted token axis to start 16-byte aligned (16 e4m3 elements); the zero columns
      change no product. T_cap = round_up(T, 16) + 16 * E bounds the padded total for any
      tokens_per_expert, so no size has to be read back to the host.

`grouped_mm_reference(a, w, counts)` is out[rows of e] = a_e @ w[e]^T and
`grouped_wgrad_reference(a, b)` is out[e] = a_e @ b_e^T (a, b: GroupColumns): both dequantise and
multiply in fp32, expert by expert (the CPU path of the FP8 expert MLP, and the emulation the GPU
tests compare `torch._scaled_grouped_mm` with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from kernels.swiglu.reference import swiglu_backward_reference as swiglu_emit_backward_reference
from kernels.swiglu.reference import swiglu_reference  # noqa: F401 (the SwiGLU reference)

from .reference import cast_to_fp8, scale_from_amax
from .tensor import FP8_DTYPE, Fp8Tensor

GROUP_ALIGN = 16  # e4m3 elements in the 16 bytes a TMA group start needs


@dataclass
class GroupColumns:
    """x [T, C] transposed, quantised per (expert, column): the wgrad operand (module doc)."""
    data: Tensor  # float8_e4m3fn [C, T_cap], row-major; group e in columns [poffs[e-1], poffs[e])
    scale: Tensor  # fp32 [E, C] decoding scales, contiguous (torch wants it flat, expert-major)
    padded_offsets: Tensor  # int32 [E]: end offsets of the padded groups along T_cap


def group_offsets(tokens_per_expert: Tensor, device: torch.device) -> Tensor:
    """End offsets of the expert groups, int32 [E] on `device` (no host sync)."""
    return tokens_per_expert.to(device=device, non_blocking=True).cumsum(0).to(torch.int32)


def padded_group_offsets(tokens_per_expert: Tensor, device: torch.device) -> Tensor:
    """End offsets of the groups padded to multiples of GROUP_ALIGN, an empty group to one
    GROUP_ALIGN of zeros (so no group of the wgrad GEMM has an empty contraction), int32 [E]."""
    n = tokens_per_expert.to(device=device, non_blocking=True).to(torch.int64)
    padded = ((n + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN).clamp(min=GROUP_ALIGN)
    return padded.cumsum(0).to(torch.int32)


def padded_capacity(T: int, E: int) -> int:
    """Width of the padded token axis: at least the padded total for any split of T rows."""
    return -(-T // GROUP_ALIGN) * GROUP_ALIGN + GROUP_ALIGN * E


def _counts(tokens_per_expert: Tensor | Sequence[int]) -> list[int]:
    if isinstance(tokens_per_expert, Tensor):
        return [int(c) for c in tokens_per_expert.tolist()]
    return [int(c) for c in tokens_per_expert]


def quantize_rows_reference(x: Tensor) -> Fp8Tensor:
    """x [R, K] -> Fp8Tensor "row": data [R, K], scale [R, 1] (one scale per row)."""
    R, K = x.shape
    a = x.float().abs()
    amax = a.amax(dim=1, keepdim=True) if K else a.new_zeros(R, 1)
    scale = scale_from_amax(amax)
    return Fp8Tensor(cast_to_fp8(x, scale), scale.contiguous(), "row")


def quantize_expert_weight_reference(w: Tensor, transpose: bool = False) -> Fp8Tensor:
    """w [E, N, K] -> Fp8Tensor "row" of w.reshape(E*N, K) (one scale per expert and output
    column N); transpose=True quantises w^T [E, K, N] instead (the dgrad operand)."""
    if w.dim() != 3:
        raise ValueError(f"expert weight must be 3-D [E, N, K], got {tuple(w.shape)}")
    if transpose:
        w = w.transpose(1, 2)
    E, N, K = w.shape
    return quantize_rows_reference(w.reshape(E * N, K))


def quantize_group_columns_reference(x: Tensor, tokens_per_expert: Tensor | Sequence[int]
                                     ) -> GroupColumns:
    """x [T, C] -> GroupColumns (module docstring). tokens_per_expert: [E], summing to T."""
    counts = _counts(tokens_per_expert)
    T, C = x.shape
    E = len(counts)
    cap = padded_capacity(T, E)
    data = torch.zeros(C, cap, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(E, C, dtype=torch.float32, device=x.device)
    start = pstart = 0
    for e, n in enumerate(counts):
        block = x[start:start + n].float()
        amax = block.abs().amax(dim=0) if n else block.new_zeros(C)
        scale[e] = scale_from_amax(amax)
        data[:, pstart:pstart + n] = cast_to_fp8(block.t(), scale[e][:, None])
        start += n
        pstart += max(-(-n // GROUP_ALIGN) * GROUP_ALIGN, GROUP_ALIGN)
    poffs = padded_group_offsets(torch.tensor(counts, dtype=torch.int64), x.device)
    return GroupColumns(data, scale, poffs)


def dequantize_rows(t: Fp8Tensor) -> Tensor:
    """fp32 matrix of a "row" Fp8Tensor."""
    return t.data.float() * t.scale.float().reshape(-1, 1)


def grouped_mm_reference(a: Fp8Tensor, w: Fp8Tensor, tokens_per_expert: Tensor | Sequence[int],
                         out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """a [T, K] rows form, w [E*N, K] expert weight -> [T, N]: rows of expert e times w[e]^T, in
    fp32 from the dequantised operands, cast to out_dtype."""
    counts = _counts(tokens_per_expert)
    E = len(counts)
    T, K = a.data.shape
    N = w.data.shape[0] // E
    a32 = dequantize_rows(a)
    w32 = dequantize_rows(w).view(E, N, K)
    out = torch.empty(T, N, dtype=out_dtype, device=a.data.device)
    start = 0
    for e, n in enumerate(counts):
        out[start:start + n] = (a32[start:start + n] @ w32[e].t()).to(out_dtype)
        start += n
    return out


def grouped_wgrad_reference(a: GroupColumns, b: GroupColumns,
                            out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """a [M, T_cap], b [N, T_cap] GroupColumns of one grouping -> [E, M, N], out[e] = a_e @ b_e^T
    over the group's (padded) token columns, in fp32 from the dequantised operands."""
    ends = [int(p) for p in a.padded_offsets.tolist()]
    E = len(ends)
    M, N = a.data.shape[0], b.data.shape[0]
    out = torch.empty(E, M, N, dtype=out_dtype, device=a.data.device)
    start = 0
    for e, end in enumerate(ends):
        ae = a.data[:, start:end].float() * a.scale[e].float()[:, None]
        be = b.data[:, start:end].float() * b.scale[e].float()[:, None]
        out[e] = (ae @ be.t()).to(out_dtype)
        start = end
    return out


def swiglu_backward_reference(grad_a: Tensor, h: Tensor, probs: Optional[Tensor]
                              ) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of swiglu_reference (kernels/swiglu/reference.py, imported here): (grad_h
    [T, 2F] in h's dtype, grad_probs [T] in probs' dtype or None), fp32 math."""
    grads, grad_probs = swiglu_emit_backward_reference(grad_a, h, probs)
    return grads.out, grad_probs
