"""Plain PyTorch SwiGLU with an optional per-row weight (the ground truth of the Triton kernels).

h [M, 2F] is megatron's fc1 output, gate = h[:, :F], up = h[:, F:] (`torch.chunk(h, 2, -1)`);
p [M] is the MoE routing probability of each token-expert row. In fp32,

    out = silu(gate) * up * p,               silu(g) = g * sigmoid(g)
    grad_gate = grad_out * p * (up * sigmoid(g) * (1 + g * (1 - sigmoid(g))))
    grad_up   = grad_out * p * silu(g)
    grad_p    = sum_F grad_out * silu(g) * up

and out / grad_h are rounded once to h's dtype. The Triton kernels compute the same formulas.
The FP8 forms are kernels/fp8/reference.py's block1x128 quantisation of those rounded tensors.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.fp8.reference import quantize_columns_reference, quantize_rows_reference
from kernels.fp8.tensor import BLOCK, Fp8Tensor

from .producer import Emitted, parse_emit


def emit_reference(out: Tensor, emit: Iterable[str]) -> Emitted:
    """The forms of `out` asked for in `emit` (see producer.py)."""
    wanted = parse_emit(emit)
    return Emitted(out if "out" in wanted else None,
                   quantize_rows_reference(out, "block1x128") if "rows" in wanted else None,
                   quantize_columns_reference(out, "block1x128") if "columns" in wanted else None)


def swiglu_reference(h: Tensor, probs: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up (* probs), computed in fp32; h [..., 2F], probs [...] -> [..., F] in
    h's dtype. Differentiable (tests take its gradients through autograd)."""
    gate, up = torch.chunk(h.float(), 2, -1)
    out = F.silu(gate) * up
    if probs is not None:
        out = out * probs.float().unsqueeze(-1)
    return out.to(h.dtype)


def swiglu_forward_reference(h: Tensor, probs: Optional[Tensor] = None,
                             emit: Iterable[str] = ("out",)) -> Emitted:
    """The reference of `swiglu_forward`: h [M, 2F], probs [M] or None."""
    return emit_reference(swiglu_reference(h, probs), emit)


def swiglu_backward_reference(grad_out: Tensor, h: Tensor, probs: Optional[Tensor] = None,
                              emit: Iterable[str] = ("out",)
                              ) -> tuple[Emitted, Optional[Tensor]]:
    """The reference of `swiglu_backward`: grad_h [M, 2F] in the emitted forms, and grad_probs
    [M] (probs' dtype) when probs is given."""
    gate, up = torch.chunk(h.float(), 2, -1)
    go = grad_out.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_probs = None
    if probs is not None:
        grad_probs = (go * silu * up).sum(-1).to(probs.dtype)
        go = go * probs.float().unsqueeze(-1)
    grad_h = torch.cat([go * (up * sig * (1 + gate * (1 - sig))), go * silu], -1)
    return emit_reference(grad_h.to(h.dtype), emit), grad_probs


# Agreement measures between a kernel's outputs and the reference's (tests and benchmarks).

def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """|a - b| in units in the last place of their (common) dtype: bf16, fp16 or fp32; +0 and -0
    are equal. int64, elementwise."""
    if a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"need two bf16, fp16 or fp32 tensors, got {a.dtype} and {b.dtype}")
    int_dtype = torch.int32 if a.dtype == torch.float32 else torch.int16
    magnitude_bits = (1 << (torch.finfo(a.dtype).bits - 1)) - 1

    def ordered(x: Tensor) -> Tensor:  # sign-magnitude bits -> integers ordered like the values
        i = x.contiguous().view(int_dtype).long()
        return torch.where(i < 0, -(i & magnitude_bits), i & magnitude_bits)

    return (ordered(a) - ordered(b)).abs()


def fp8_agreement(got: Fp8Tensor, ref: Fp8Tensor) -> dict:
    """How closely two block1x128 Fp8Tensors of one tensor agree:
      equal_bytes      fraction of e4m3 data bytes that are equal;
      max_step_error   max |dequantised got - dequantised ref| in units of one e4m3 step of the
                       reference element (2^(floor(log2 max(|q|, 2^-6)) - 3) * scale);
      scale_max_rel    max relative difference of the scales (NaN where got is unwritten).
    Raises if the shapes or the scale layout differ."""
    if got.data.shape != ref.data.shape or got.scale.shape != ref.scale.shape:
        raise ValueError(f"shapes differ: data {tuple(got.data.shape)} vs "
                         f"{tuple(ref.data.shape)}, scale {tuple(got.scale.shape)} vs "
                         f"{tuple(ref.scale.shape)}")
    R, K = ref.data.shape
    expand = lambda s: s.float().repeat_interleave(BLOCK, dim=1)[:, :K]
    q_ref = ref.data.float()
    step = torch.exp2(torch.floor(torch.log2(q_ref.abs().clamp_min(2.0 ** -6))) - 3)
    error = (got.data.float() * expand(got.scale) - q_ref * expand(ref.scale)).abs()
    worst = lambda t: t.nan_to_num(float("inf")).max().item()  # NaN (unwritten) is worst
    equal = got.data.view(torch.uint8) == ref.data.view(torch.uint8)
    return {"equal_bytes": equal.double().mean().item(),
            "max_step_error": worst(error / (step * expand(ref.scale))),
            "scale_max_rel": worst((got.scale - ref.scale).abs() / ref.scale)}
