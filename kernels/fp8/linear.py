"""FP8 linear layer y = x @ W^T with FP8 GEMMs forward and backward, and the weight cache.

Recipes (scalings of activations / weights / output gradients; GEMMs in gemm.py):
  tensorwise          tensor / tensor / tensor      all three GEMMs torch._scaled_mm tensorwise
  tensorwise_delayed  as tensorwise, with delayed scaling of activations and gradients
  rowwise             row / row / row               all three GEMMs torch._scaled_mm rowwise
  blockwise           block1x128 / block128x128 /   fwd and dgrad 1x128 x 128x128, wgrad
                      block1x128                    1x128 x 1x128 (F.scaled_mm)
Delayed scaling (amax_history.py) takes the scale of x and of dy from the amaxes of the layer's
previous AMAX_HISTORY inputs / output gradients and quantises each in one read instead of two; the
caller keeps one `DelayedScaling` per linear layer. Weights are always current-scaled (and cached).
The three GEMMs:
  forward  y [M, N]  = fp8_gemm(x rows [M, K],      W [N, K])
  dgrad    dx [M, K] = fp8_gemm(dy rows [M, N],     W^T [K, N])   W^T: exact transpose
                       (block128x128, tensor) or W's columns re-quantised (row)
  wgrad    dW [N, K] = fp8_gemm(dy columns [N, M],  x columns [K, M])
Forward saves only x's columns form (FP8, for wgrad) and the FP8 W^T (for dgrad), never the
high-precision x. dy is quantised to rows and columns in one read. tensorwise and rowwise run the
forward GEMM with Hopper's fast accumulation (as torchao does); the gradient GEMMs never do.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .amax_history import AmaxHistory
from .gemm import fp8_gemm
from .quantize import (quantize_columns, quantize_forms, quantize_weight,
                       quantize_weight_and_transpose, transpose_fp8)
from .tensor import Fp8Tensor

__all__ = ["fp8_linear", "Fp8WeightCache", "WEIGHT_CACHE", "RECIPES", "Recipe", "DelayedScaling"]


@dataclass(frozen=True)
class Recipe:
    activation: str  # scaling of x (rows and columns forms)
    weight: str  # scaling of W (and of its dgrad operand)
    grad: str  # scaling of dy (rows and columns forms)
    fast_accum_forward: bool
    amax_history: int = 0  # > 0: delayed scaling of x and dy over that many previous tensors


# Torchao's delayed-scaling default; the amax of a layer's input changes slowly over 16 steps.
AMAX_HISTORY = 16

RECIPES = {
    "tensorwise": Recipe("tensor", "tensor", "tensor", True),
    "tensorwise_delayed": Recipe("tensor", "tensor", "tensor", True, AMAX_HISTORY),
    "rowwise": Recipe("row", "row", "row", True),
    "blockwise": Recipe("block1x128", "block128x128", "block1x128", False),
}


class DelayedScaling:
    """The amax histories of one linear layer under a delayed-scaling recipe: its input x and its
    output gradient dy (amax_history.py)."""

    def __init__(self, length: int = AMAX_HISTORY) -> None:
        self.input = AmaxHistory(length)
        self.grad = AmaxHistory(length)

    @classmethod
    def for_recipe(cls, recipe: str) -> Optional["DelayedScaling"]:
        """A fresh DelayedScaling if `recipe` scales with delay, else None."""
        n = RECIPES[recipe].amax_history
        return cls(n) if n else None


@dataclass
class _Entry:
    ref: weakref.ref  # the weight tensor the entry was made from
    version: int  # its _version then
    generation: int  # the cache's generation then
    shape: torch.Size
    dtype: torch.dtype
    value: object  # what was made from the weight

    def valid_for(self, weight: Tensor, generation: int) -> bool:
        return (self.ref() is weight and self.version == weight._version
                and self.generation == generation and self.shape == weight.shape
                and self.dtype == weight.dtype)


class Fp8WeightCache:
    """Quantised weights (and their dgrad operands) reused while a weight is unchanged, e.g.
    across the micro-batches of one gradient-accumulation step.

    An entry is keyed on (weight.data_ptr(), tag) and valid while the weight is the same tensor
    object with the same shape, dtype and `_version`, and no `invalidate()` came since. In-place
    updates through the tensor itself (`optimizer.step()`, `with no_grad(): w.add_(...)`) bump
    `_version`. Writes that bypass it do NOT: `w.data.add_()`, `w.data.copy_()`, and writes into a
    buffer the weight views, e.g. megatron-core's DistributedOptimizer copying main params into the
    param buffer and all-gathering it. With such writers call `invalidate()` after every optimizer
    step (before the next forward), or the cache serves stale weights.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[int, object], _Entry] = {}
        self.generation = 0
        self.hits = 0
        self.misses = 0

    def invalidate(self) -> None:
        """Drops every entry; call after weights change behind autograd's back."""
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def _ref(self, weight: Tensor, key: tuple) -> weakref.ref:
        """A weak reference to weight that drops its entry when the weight is freed."""
        entries = self._entries

        def drop(ref: weakref.ref) -> None:
            e = entries.get(key)
            if e is not None and e.ref is ref:
                del entries[key]

        return weakref.ref(weight, drop)

    def lookup(self, weight: Tensor, tag: object, make: Callable[[], object]) -> object:
        """What make() builds from `weight` (any FP8 form; `tag`, hashable, names it), made on
        the first call and returned again while the weight is unchanged."""
        key = (weight.data_ptr(), tag)
        e = self._entries.get(key)
        if e is None or not e.valid_for(weight, self.generation):
            self.misses += 1
            value = make()
            self._entries[key] = _Entry(self._ref(weight, key), weight._version, self.generation,
                                        weight.shape, weight.dtype, value)
            return value
        self.hits += 1
        return e.value

    def get(self, weight: Tensor, recipe: str, need_transposed: bool
            ) -> tuple[Fp8Tensor, Optional[Fp8Tensor]]:
        """(W [N, K], its dgrad operand [K, N] or None unless need_transposed) for `recipe`
        (recipes with the same weight scaling share the entry)."""
        scaling = RECIPES[recipe].weight
        pair = self.lookup(weight, scaling, lambda: list(
            _quantize_weight(weight, scaling, need_transposed)))
        if need_transposed and pair[1] is None:  # made by a call that did not need it
            pair[1] = _transposed_operand(weight, pair[0])
        return pair[0], pair[1]


# A process-wide cache for callers that share one (e.g. every linear layer of a model); the
# trainer then calls WEIGHT_CACHE.invalidate() after each optimizer step.
WEIGHT_CACHE = Fp8WeightCache()


def _quantize_weight(weight: Tensor, scaling: str, need_transposed: bool
                     ) -> tuple[Fp8Tensor, Optional[Fp8Tensor]]:
    w = weight.detach()
    if need_transposed:
        return quantize_weight_and_transpose(w, scaling)
    return quantize_weight(w, scaling), None


def _transposed_operand(weight: Tensor, w: Fp8Tensor) -> Fp8Tensor:
    """The dgrad operand of W^T, given W's FP8 form w (exact where the scaling allows)."""
    if w.scaling == "row":
        return quantize_columns(weight.detach(), "row")
    return transpose_fp8(w)


def quantize_layer_weight(weight: Tensor, recipe: str, cache: Optional[Fp8WeightCache],
                          need_transposed: bool) -> tuple[Fp8Tensor, Optional[Fp8Tensor]]:
    """(W [N, K], its dgrad operand [K, N] or None unless need_transposed) under `recipe`, from
    `cache` where given."""
    if cache is not None:
        return cache.get(weight, recipe, need_transposed)
    return _quantize_weight(weight, RECIPES[recipe].weight, need_transposed)


def _forward(x: Tensor, weight: Tensor, recipe: str, cache: Optional[Fp8WeightCache],
             delayed: Optional[DelayedScaling], need_dx: bool, need_dw: bool
             ) -> tuple[Tensor, Optional[Fp8Tensor], Optional[Fp8Tensor]]:
    """y [..., N] and what backward needs: x's columns form if need_dw, the dgrad operand of
    W^T if need_dx (else None)."""
    r = RECIPES[recipe]
    x2 = x.detach().reshape(-1, x.shape[-1])
    history = delayed.input if delayed is not None else None
    x_rows, x_cols = quantize_forms(x2, r.activation, True, need_dw, history)
    w, wt = quantize_layer_weight(weight, recipe, cache, need_dx)
    y = fp8_gemm(x_rows, w, out_dtype=x.dtype, use_fast_accum=r.fast_accum_forward)
    return y.view(*x.shape[:-1], weight.shape[0]), x_cols, wt


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, recipe: str, cache: Optional[Fp8WeightCache],
                delayed: Optional[DelayedScaling]) -> Tensor:
        y, x_cols, wt = _forward(x, weight, recipe, cache, delayed, *ctx.needs_input_grad[:2])
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = (RECIPES[recipe], x.shape, x.dtype,
                                                             weight.dtype)
        ctx.grad_history = delayed.grad if delayed is not None else None
        saved = []
        for t in (x_cols, wt):
            saved += [t.data, t.scale] if t is not None else [None, None]
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        r = ctx.recipe
        xc_data, xc_scale, wt_data, wt_scale = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        dy_rows, dy_cols = quantize_forms(dy2, r.grad, need_dx, need_dw, ctx.grad_history)
        if need_dx:
            wt = Fp8Tensor(wt_data, wt_scale, r.weight)
            dx = fp8_gemm(dy_rows, wt, out_dtype=ctx.x_dtype).view(ctx.x_shape)
        if need_dw:
            # Rounded once from the fp32 accumulator, as an fp32 output cast would be.
            dw = fp8_gemm(dy_cols, Fp8Tensor(xc_data, xc_scale, r.activation),
                          out_dtype=ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, recipe: str = "blockwise",
               cache: Optional[Fp8WeightCache] = None,
               delayed: Optional[DelayedScaling] = None) -> Tensor:
    """y = x @ weight^T with FP8 GEMMs in forward and backward (no bias).

    x: [..., K] (bf16, fp16 or fp32); weight: [N, K]; returns [..., N] in x's dtype; the weight
    gradient comes in weight's dtype. recipe: one of RECIPES. cache: an Fp8WeightCache to reuse
    the quantised weight while it is unchanged (read its docstring for when to invalidate);
    None quantises the weight on every call. delayed: this layer's DelayedScaling, required by
    (and only by) the delayed-scaling recipes; keep one per layer across steps.
    """
    if recipe not in RECIPES:
        raise ValueError(f"fp8_linear recipe must be one of {tuple(RECIPES)}, got {recipe!r}")
    if bool(RECIPES[recipe].amax_history) != (delayed is not None):
        raise ValueError(
            f"fp8_linear recipe {recipe!r} " + ("keeps amax histories per layer: pass "
            "delayed=DelayedScaling.for_recipe(recipe), made once per linear layer and reused "
            "every step" if delayed is None else "does not scale with delay: pass delayed=None"))
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear needs x [..., K] and weight [N, K]; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _forward(x, weight, recipe, cache, delayed, False, False)[0]  # forward only
    return _Fp8Linear.apply(x, weight, recipe, cache, delayed)
