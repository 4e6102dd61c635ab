"""Two FP8 linear layers in a row, y = (x @ W1^T) @ W2^T, with the product between them quantised
in the epilogue of the GEMM that makes it.

`fp8_linear_pair(x, w1, w2, ...)` computes what fp8_linear(fp8_linear(x, w1), w2) computes under
the tensorwise_delayed recipe, with the same per-layer DelayedScaling states, but the
intermediate h = x @ W1^T (forward) and its gradient dh = dy @ W2 (backward) never exist in bf16:
the GEMMs that produce them write their FP8 rows and columns forms directly
(triton_gemm.fp8_gemm_quantized). Each is otherwise written in bf16, read back by a quantiser and
written again in FP8 (the largest memory traffic of an FP8 MLP without an activation between its
linears: both are tokens x hidden).

The six GEMMs, as in fp8_linear (gemm.py runs the four plain ones):
  h     rows, cols = epilogue(x rows @ W1^T)       fast accumulation, as fp8_linear's forward
  y     = h rows @ W2^T                            fast accumulation
  dh    rows, cols = epilogue(dy rows @ W2)        fast accumulation (fp8_linear: precise)
  dW2   = dy cols @ h cols^T;  dx = dh rows @ W1;  dW1 = dh cols @ x cols^T   precise
dh's GEMM is the one departure from the chain: both epilogue GEMMs accumulate in the FP8 MMA's
reduced precision, because their product is rounded to e4m3 right after, whose rounding error
(~2.7% RMS) swamps the fast accumulation's (~0.1% at K = 4096): on the H100 the quantised product
is 0.02674 from the exact one with fast accumulation against 0.02671 with precise
(tests/kernels/test_fp8_triton_gemm.py), while the Triton GEMM's precise mode runs 1.4-1.8x
slower (benchmarks/fp8_mlp).
The delayed scales: h from layer 2's input history, dh from layer 1's gradient history, which is
where the unfused chain takes them. The product is rounded to x's dtype before quantisation, as
the unfused chain's bf16 output is, so the forward quantises the same values as the chain up to
the GEMMs' accumulation order.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .gemm import fp8_gemm
from .linear import DelayedScaling, Fp8WeightCache, quantize_layer_weight
from .quantize import quantize_forms
from .tensor import Fp8Tensor
from .triton_gemm import fp8_gemm_quantized

__all__ = ["fp8_linear_pair", "PAIR_RECIPES"]

# The epilogue needs the scale before the product exists: delayed tensor scaling.
PAIR_RECIPES = ("tensorwise_delayed",)


def _forward(x: Tensor, w1: Tensor, w2: Tensor, recipe: str, cache: Optional[Fp8WeightCache],
             d1: DelayedScaling, d2: DelayedScaling, need_x: bool, need_w1: bool, need_w2: bool
             ) -> tuple[Tensor, tuple]:
    """y [..., N] and what backward needs of (x columns, W1^T, h columns, W2^T) (None where the
    gradients asked for do not need it)."""
    need_dh = need_x or need_w1
    x_rows, x_cols = quantize_forms(x.detach().reshape(-1, x.shape[-1]), "tensor", True,
                                    need_w1, d1.input)
    w1q, w1t = quantize_layer_weight(w1, recipe, cache, need_x)
    w2q, w2t = quantize_layer_weight(w2, recipe, cache, need_dh)
    h_rows, h_cols = fp8_gemm_quantized(x_rows, w1q, d2.input, out_dtype=x.dtype,
                                        use_fast_accum=True, columns=need_w2)
    y = fp8_gemm(h_rows, w2q, out_dtype=x.dtype, use_fast_accum=True)
    return y.view(*x.shape[:-1], w2.shape[0]), (x_cols, w1t, h_cols, w2t)


class _Fp8LinearPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, w2: Tensor, recipe: str,
                cache: Optional[Fp8WeightCache], d1: DelayedScaling, d2: DelayedScaling
                ) -> Tensor:
        y, for_backward = _forward(x, w1, w2, recipe, cache, d1, d2, *ctx.needs_input_grad[:3])
        ctx.x_shape, ctx.dtypes = x.shape, (x.dtype, w1.dtype, w2.dtype)
        ctx.grad_histories = d1.grad, d2.grad
        saved = []
        for t in for_backward:
            saved += [t.data, t.scale] if t is not None else [None, None]
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        x_dtype, w1_dtype, w2_dtype = ctx.dtypes
        saved = ctx.saved_tensors
        x_cols, w1t, h_cols, w2t = (Fp8Tensor(saved[i], saved[i + 1], "tensor")
                                    if saved[i] is not None else None for i in range(0, 8, 2))
        dh_history, dy_history = ctx.grad_histories
        need_dh = need_x or need_w1
        dy_rows, dy_cols = quantize_forms(dy.reshape(-1, dy.shape[-1]), "tensor", need_dh,
                                          need_w2, dy_history)
        dx = dw1 = dw2 = None
        if need_dh:
            dh_rows, dh_cols = fp8_gemm_quantized(dy_rows, w2t, dh_history, out_dtype=x_dtype,
                                                  use_fast_accum=True, rows=need_x,
                                                  columns=need_w1)
            if need_x:
                dx = fp8_gemm(dh_rows, w1t, out_dtype=x_dtype).view(ctx.x_shape)
            if need_w1:
                dw1 = fp8_gemm(dh_cols, x_cols, out_dtype=w1_dtype)
        if need_w2:
            dw2 = fp8_gemm(dy_cols, h_cols, out_dtype=w2_dtype)
        return dx, dw1, dw2, None, None, None, None


def fp8_linear_pair(x: Tensor, w1: Tensor, w2: Tensor, recipe: str = "tensorwise_delayed",
                    cache: Optional[Fp8WeightCache] = None,
                    delayed1: Optional[DelayedScaling] = None,
                    delayed2: Optional[DelayedScaling] = None) -> Tensor:
    """(x @ w1^T) @ w2^T with FP8 GEMMs forward and backward (no bias, nothing between them).

    x: [..., K] (bf16, fp16 or fp32); w1: [H, K]; w2: [N, H]; returns [..., N] in x's dtype.
    recipe: one of PAIR_RECIPES. cache: as fp8_linear's. delayed1, delayed2: the two layers'
    DelayedScaling states (required; keep them across steps, as for fp8_linear)."""
    if recipe not in PAIR_RECIPES:
        raise ValueError(f"fp8_linear_pair quantises in its GEMM epilogues, which needs delayed "
                         f"scaling: recipe must be one of {PAIR_RECIPES}, got {recipe!r}; other "
                         "recipes: fp8_linear(fp8_linear(x, w1, recipe), w2, recipe)")
    if not isinstance(delayed1, DelayedScaling) or not isinstance(delayed2, DelayedScaling):
        raise ValueError("fp8_linear_pair needs each layer's DelayedScaling: pass delayed1= and "
                         "delayed2= (DelayedScaling.for_recipe(recipe)), made once and reused "
                         "every step")
    if (w1.dim() != 2 or w2.dim() != 2 or x.shape[-1] != w1.shape[1]
            or w2.shape[1] != w1.shape[0]):
        raise ValueError(f"fp8_linear_pair needs x [..., K], w1 [H, K], w2 [N, H]; got x "
                         f"{tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2))):
        return _forward(x, w1, w2, recipe, cache, delayed1, delayed2, False, False, False)[0]
    return _Fp8LinearPair.apply(x, w1, w2, recipe, cache, delayed1, delayed2)
