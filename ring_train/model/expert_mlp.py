"""The routed experts' MLP over expert-sorted token rows, as one autograd Function.

For the rows x_e of expert e (rows offs[e-1]:offs[e] of x, offs = cumsum(tokens_per_expert)):

    h   = x_e @ w1[e]^T                          [T_e, 2F]  gate rows of w1 first, then up rows
    a   = silu(h[:, :F]) * h[:, F:] * probs_e    [T_e, F]
    y_e = a @ w2[e]^T                            [T_e, d]

The routing probability multiplies the activation *output* in fp32 and the product is rounded once
to x's dtype, as megatron's SequentialMLP / TEGroupedMLP do with moe_apply_probs_on_input False
(`activation_func_with_probs`, `weighted_bias_swiglu_impl`: (swiglu(h) * probs).to(dtype)); our
SwiGLU is computed in fp32 too, where megatron's unfused path rounds silu(gate) * up to bf16 first.

GEMMs: bf16 `torch._grouped_mm` on CUDA bf16 tensors, a loop over experts elsewhere (the CPU
reference path); with `fp8` the rowwise FP8 grouped GEMMs of kernels/fp8/grouped.py
(`torch._scaled_grouped_mm` on CUDA, their emulation on CPU). tokens_per_expert stays on the device:
no host sync on the grouped paths.

Saved for backward, per routed token row (d = 2048, F = 512 for Ring-mini; probs add 4 B):

    path    recompute=False                 recompute=True
    bf16    x (2d) + h (4F)     = 6144 B    x (2d)                       = 4096 B
    fp8     x cols (d') + h (4F) = 4256 B   x rows (d + 4) + x cols (d') = 4260 B
    d' = d + 16Ed/T + 4Ed/T: x's columns form has a padded token axis (grouped_reference.py) and
    E x d fp32 scales, 160 B per row at E = 256, T = 65536 (20 B at E = 32). Megatron's
    SequentialMLP keeps x, h and a (2d + 4F + 2F = 7168 B; more with its default unfused
    activation, which also saves silu(gate) and silu(gate) * up).

recompute=True drops h and a and rebuilds them in backward from what it cannot rebuild cheaply: x
(bf16), or with FP8 only x's two quantised forms (rows for the fc1 GEMM, group columns for the fc1
weight gradient), and probs. So it saves 4F bytes per row in bf16 (2048 B, a third) and, with FP8,
4F - d - 4 bytes (nothing at Ring-mini's d = 4F: keeping x's rows form costs what dropping h
saves; FP8 recompute pays off only where 4F > d).
With FP8 each pass emits only the quantised form of a its GEMM reads: the forward the rows form
(fc2's A operand), backward, from h, the group-columns form (fc2's weight-gradient operand); a
itself is never materialised in FP8 mode. Without recompute FP8 also saves no form of a: backward
computes the columns form from the saved h.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kernels.fp8 import grouped as fp8g
from kernels.fp8.grouped_reference import (GroupColumns, group_offsets, padded_group_offsets,
                                           swiglu_backward_reference, swiglu_reference)
from kernels.fp8.linear import WEIGHT_CACHE
from kernels.fp8.tensor import Fp8Tensor

__all__ = ["expert_mlp", "FP8_RECIPES"]

# Any FP8 recipe runs the experts' GEMMs rowwise: torch (2.11) has no blockwise or tensorwise
# grouped GEMM.
FP8_RECIPES = ("rowwise", "blockwise", "tensorwise", "tensorwise_delayed")

logger = logging.getLogger(__name__)
_logged: set = set()


def _log_once(key, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


# -- SwiGLU: the fused kernels of kernels/swiglu where present, else the PyTorch reference --------

def _swiglu_impl():
    """(forward(h, probs) -> a, backward(grad_a, h, probs) -> (grad_h, grad_probs), name)."""
    try:
        from kernels.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return swiglu_reference, swiglu_backward_reference, "PyTorch reference"

    def forward(h, probs):
        return swiglu_forward(h, probs).out

    def backward(grad_a, h, probs):
        grads, grad_probs = swiglu_backward(grad_a, h, probs)
        return grads.out, grad_probs

    return forward, backward, "kernels.swiglu"


def _swiglu_forward(h: Tensor, probs: Tensor) -> Tensor:
    forward, _, name = _swiglu_impl()
    _log_once(("swiglu", name), f"expert MLP SwiGLU: {name}")
    return forward(h, probs)


def _swiglu_backward(grad_a: Tensor, h: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    return _swiglu_impl()[1](grad_a, h, probs)


# -- bf16 GEMMs over the groups -----------------------------------------------------------------

@dataclass
class _Groups:
    """The expert grouping of the rows: end offsets on the device (grouped and FP8 paths; poffs:
    of the groups padded for the FP8 wgrad), sizes on the host (loop path only: reading them
    syncs a CUDA device, which only the fallback does)."""
    offs: Tensor
    poffs: Optional[Tensor]
    counts: Optional[list[int]]
    grouped: bool  # bf16 torch._grouped_mm (else the loop; unused with FP8)

    @classmethod
    def of(cls, tokens_per_expert: Tensor, x: Tensor, fp8: bool) -> "_Groups":
        grouped = (not fp8 and x.is_cuda and x.dtype == torch.bfloat16
                   and hasattr(torch, "_grouped_mm"))
        if not fp8:
            path = "torch._grouped_mm" if grouped else "per-expert loop"
            _log_once(("bf16", path, x.device.type, x.dtype),
                      f"expert MLP: {path} on {x.device.type} ({x.dtype})")
        return cls(group_offsets(tokens_per_expert, x.device),
                   padded_group_offsets(tokens_per_expert, x.device) if fp8 else None,
                   None if grouped or fp8 else [int(c) for c in tokens_per_expert.tolist()],
                   grouped)


def _loop_mm(a: Tensor, b: Tensor, counts: list[int]) -> Tensor:
    """Rows of group e times b[e] (b [E, K, N]) -> [T, N]."""
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for e, n in enumerate(counts):
        torch.matmul(a[start:start + n], b[e], out=out[start:start + n])
        start += n
    return out


def _linear(a: Tensor, w: Tensor, g: _Groups) -> Tensor:
    """a [T, K], w [E, N, K] -> [T, N]: rows of group e times w[e]^T."""
    if g.grouped:
        return torch._grouped_mm(a, w.transpose(1, 2), offs=g.offs)
    return _loop_mm(a, w.transpose(1, 2), g.counts)


def _linear_dgrad(a: Tensor, w: Tensor, g: _Groups) -> Tensor:
    """a [T, N], w [E, N, K] -> [T, K]: rows of group e times w[e]."""
    if g.grouped:
        return torch._grouped_mm(a, w, offs=g.offs)
    return _loop_mm(a, w, g.counts)


def _wgrad(a: Tensor, b: Tensor, g: _Groups) -> Tensor:
    """a [T, M], b [T, N] -> [E, M, N]: a_e^T @ b_e over each group's rows (zeros if empty)."""
    if g.grouped:
        # a^T is a column-major view: its group starts are a's row starts, aligned for any size.
        return torch._grouped_mm(a.t(), b, offs=g.offs)
    out = a.new_zeros(len(g.counts), a.shape[1], b.shape[1])
    start = 0
    for e, n in enumerate(g.counts):
        if n:
            torch.matmul(a[start:start + n].t(), b[start:start + n], out=out[e])
        start += n
    return out


# -- the autograd Function ----------------------------------------------------------------------

def _expert_weight(w: Tensor, transpose: bool = False) -> Fp8Tensor:
    """w's FP8 operand (fp8g.quantize_expert_weight), quantised once per optimizer step: the
    micro-batches of a step and the recomputed fc1 reuse it (linear.WEIGHT_CACHE, which the
    trainer invalidates at every step)."""
    return WEIGHT_CACHE.lookup(w, ("expert", transpose),
                               lambda: fp8g.quantize_expert_weight(w.detach(), transpose))


def _fc1_fp8(xr: Fp8Tensor, w1: Tensor, g: _Groups, dtype: torch.dtype) -> Tensor:
    return fp8g.grouped_mm(xr, _expert_weight(w1), g.offs, dtype)


class ExpertMLPFunction(torch.autograd.Function):
    """expert_mlp's forward and backward; see the module docstring for what each mode saves."""

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, w1: Tensor, w2: Tensor,
                tokens_per_expert: Tensor, fp8: bool, recompute: bool) -> Tensor:
        ctx.fp8, ctx.recompute, ctx.x_dtype = fp8, recompute, x.dtype
        ctx.empty = x.shape[0] == 0
        if ctx.empty:  # no rows: the weights still get (zero) gradients
            ctx.save_for_backward(w1, w2)
            return x.new_zeros(0, w2.shape[1])
        g = _Groups.of(tokens_per_expert, x, fp8)
        ctx.counts, ctx.grouped = g.counts, g.grouped
        if fp8:
            xr = fp8g.quantize_rows(x)
            xc = fp8g.quantize_group_columns(x, g.offs, g.poffs)
            h = _fc1_fp8(xr, w1, g, x.dtype)
            ar = fp8g.quantize_swiglu_rows(h, probs)  # the rows form only: fc2's operand
            y = fp8g.grouped_mm(ar, _expert_weight(w2), g.offs, x.dtype)
            kept = (xc.data, xc.scale) + ((xr.data, xr.scale) if recompute else (h,))
        else:
            h = _linear(x, w1, g)
            y = _linear(_swiglu_forward(h, probs), w2, g)
            kept = (x,) if recompute else (x, h)
        ctx.save_for_backward(probs, w1, w2, g.offs, g.poffs, *kept)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        if ctx.empty:
            w1, w2 = ctx.saved_tensors
            return (dy.new_zeros(0, w1.shape[2]), dy.new_zeros(0, dtype=torch.float32),
                    torch.zeros_like(w1), torch.zeros_like(w2), None, None, None)
        probs, w1, w2, offs, poffs, *kept = ctx.saved_tensors
        g = _Groups(offs, poffs, ctx.counts, ctx.grouped)
        dy = dy.contiguous()
        if ctx.fp8:
            dx, dprobs, dw1, dw2 = _backward_fp8(ctx, dy, probs, w1, w2, g, kept)
        else:
            dx, dprobs, dw1, dw2 = _backward_bf16(ctx, dy, probs, w1, w2, g, kept)
        return dx, dprobs, dw1.to(w1.dtype), dw2.to(w2.dtype), None, None, None


def _backward_bf16(ctx, dy, probs, w1, w2, g, kept):
    x = kept[0]
    h = _linear(x, w1, g) if ctx.recompute else kept[1]
    dw2 = _wgrad(dy, _swiglu_forward(h, probs), g)  # [E, d, F]
    dh, dprobs = _swiglu_backward(_linear_dgrad(dy, w2, g), h, probs)
    del h
    dw1 = _wgrad(dh, x, g)  # [E, 2F, d]
    dx = _linear_dgrad(dh, w1, g) if ctx.needs_input_grad[0] else None
    return dx, dprobs, dw1, dw2


def _backward_fp8(ctx, dy, probs, w1, w2, g, kept):
    dtype = ctx.x_dtype
    xc = GroupColumns(kept[0], kept[1], g.poffs)
    if ctx.recompute:
        h = _fc1_fp8(Fp8Tensor(kept[2], kept[3], "row"), w1, g, dtype)
    else:
        h = kept[2]
    dyc = fp8g.quantize_group_columns(dy, g.offs, g.poffs)
    # The columns form of a only: fc2's weight-gradient operand.
    ac = fp8g.quantize_swiglu_columns(h, probs, g.offs, g.poffs)
    dw2 = fp8g.grouped_wgrad(dyc, ac, w2.dtype)  # [E, d, F]
    del dyc, ac
    da = fp8g.grouped_mm(fp8g.quantize_rows(dy), _expert_weight(w2, transpose=True),
                         g.offs, dtype)
    dh, dprobs = _swiglu_backward(da, h, probs)
    del da, h
    dw1 = fp8g.grouped_wgrad(fp8g.quantize_group_columns(dh, g.offs, g.poffs), xc,
                             w1.dtype)  # [E, 2F, d]
    dx = None
    if ctx.needs_input_grad[0]:
        dx = fp8g.grouped_mm(fp8g.quantize_rows(dh),
                             _expert_weight(w1, transpose=True), g.offs, dtype)
    return dx, dprobs, dw1, dw2


def expert_mlp(x: Tensor, probs: Tensor, w1: Tensor, w2: Tensor, tokens_per_expert: Tensor,
               fp8: Optional[str] = None, recompute: bool = False) -> Tensor:
    """Routed experts' SwiGLU MLP over expert-sorted rows (module docstring).

    x: [T, d] (bf16 on GPU), rows sorted by expert; probs: [T] routing probability of each row
    (fp32); w1: [E, 2F, d]; w2: [E, d, F]; tokens_per_expert: [E] integers summing to T (device
    or CPU tensor). fp8: None / "none" for bf16 GEMMs, or an FP8 recipe (FP8_RECIPES: every recipe
    runs the rowwise grouped GEMMs). recompute: rebuild h and a in backward instead of saving
    them. Returns y [T, d] in x's dtype; differentiable in x, probs, w1 and w2.
    """
    if fp8 in (None, "none"):
        fp8 = None
    elif fp8 not in FP8_RECIPES:
        raise ValueError(f"fp8 must be None, 'none' or one of {FP8_RECIPES}, got {fp8!r}")
    elif fp8 != "rowwise":
        _log_once(("recipe", fp8), f"expert MLP: fp8 recipe {fp8!r} requested; the routed "
                  "experts run rowwise FP8 grouped GEMMs (torch has no other grouped FP8 GEMM)")
    T, d = x.shape
    E, two_f, d1 = w1.shape
    if d1 != d or tuple(w2.shape) != (E, d, two_f // 2) or two_f % 2:
        raise ValueError(f"expected w1 [E, 2F, {d}] and w2 [E, {d}, F], got {tuple(w1.shape)} "
                         f"and {tuple(w2.shape)}")
    if probs.shape != (T,) or tokens_per_expert.shape != (E,):
        raise ValueError(f"expected probs [{T}] and tokens_per_expert [{E}], got "
                         f"{tuple(probs.shape)} and {tuple(tokens_per_expert.shape)}")
    # Rows past the last group would be left unwritten by the grouped GEMMs. Checked where it
    # costs no device sync (tokens_per_expert on the host).
    if not tokens_per_expert.is_cuda and int(tokens_per_expert.sum()) != T:
        raise ValueError(f"tokens_per_expert sums to {int(tokens_per_expert.sum())}, but x has "
                         f"{T} rows")
    return ExpertMLPFunction.apply(x.contiguous(), probs.contiguous(), w1, w2, tokens_per_expert,
                                   fp8 is not None, recompute)
