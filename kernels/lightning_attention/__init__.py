"""Lightning attention (causal linear attention with a per-head constant decay): one dispatch point.

Backends:
  triton the fused kernels in `triton_kernels.py` (CUDA tensors, or CPU under TRITON_INTERPRET=1);
  torch  the chunked PyTorch form in `reference.py` (any device; the CPU training path);
  fla    fla-core's `chunk_simple_gla` with `g_gamma = -slope` (CUDA; only when selected).
"auto" (the default) picks triton for CUDA tensors when Triton is installed, else torch. Select
with `set_backend(name)` or the environment variable RING_LA_BACKEND. A backend that is selected
explicitly but cannot run is an error, never a silent fallback; the first call on each path logs
which path runs.
"""

import importlib.util
import logging
import os
from typing import Optional

from torch import Tensor

from kernels.triton_support import interpreting

from .reference import lightning_attention_chunked, lightning_attention_decode_reference

__all__ = ["lightning_attention", "lightning_attention_decode", "set_backend", "get_backend"]

BACKENDS = ("auto", "triton", "torch", "fla")
ENV_VAR = "RING_LA_BACKEND"

logger = logging.getLogger(__name__)
_backend: Optional[str] = None  # None: read ENV_VAR on first use
_logged: set[tuple[str, ...]] = set()


def set_backend(name: str) -> None:
    """Selects the backend for every later call: one of BACKENDS."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"lightning attention backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The selected backend name (set_backend, else RING_LA_BACKEND, else "auto")."""
    if _backend is None:
        set_backend(os.environ.get(ENV_VAR, "auto"))
    return _backend


def _resolve(q: Tensor) -> str:
    """The backend that runs for inputs on q's device; raises if the selected one cannot."""
    name = get_backend()
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        name = "triton" if q.is_cuda and has_triton else "torch"
    if name == "triton":
        if not has_triton:
            raise RuntimeError("lightning attention backend 'triton' was selected but Triton is "
                               f"not installed; select another with {ENV_VAR}")
        if not (q.is_cuda or interpreting()):
            raise RuntimeError(f"lightning attention backend 'triton' needs CUDA tensors (or "
                               f"TRITON_INTERPRET=1), got {q.device}; select 'torch' or 'auto'")
    if name == "fla":
        if importlib.util.find_spec("fla") is None:
            raise RuntimeError("lightning attention backend 'fla' was selected but fla-core is "
                               "not installed (pip install fla-core); or select another with "
                               f"{ENV_VAR}")
        if not q.is_cuda:
            raise RuntimeError("lightning attention backend 'fla' needs CUDA tensors, got "
                               f"{q.device}; select 'torch' or 'auto' on this device")
    _log_once(name, q.device.type, f"lightning attention: {name} backend on {q.device.type} "
              f"(selected: {get_backend()})")
    return name


def _log_once(*key_and_message: str) -> None:
    *key, message = key_and_message
    if tuple(key) not in _logged:
        _logged.add(tuple(key))
        logger.info(message)


def _fla(q, k, v, slope, scale, initial_state, output_final_state, cu_seqlens):
    from fla.ops.simple_gla import chunk_simple_gla

    # fla takes [B, T, H, D]; the transposes are views (fla copies to contiguous itself).
    o, final = chunk_simple_gla(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                g_gamma=-slope.float(), scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state,
                                cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())
    return o.transpose(0, 1), final


def lightning_attention(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, *,
                        scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                        output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None
                        ) -> tuple[Tensor, Optional[Tensor]]:
    """Causal linear attention with per-head constant decay (Lightning Attention / simple GLA).

    q, k, v: [T, B, H, D] sequence-first (megatron layout), any strides, last dim contiguous.
    slope: [H] fp32, positive; the per-step decay of head h is lambda_h = exp(-slope[h]).
    scale: default D ** -0.5 (applied to q).
    State S in R^{D_k x D_v}, fp32: S_t = lambda * S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t.
    initial_state: [N, H, D, D] fp32 (N = B, or the number of sequences when cu_seqlens is given).
    cu_seqlens: int32/int64 [N+1] document boundaries of packed sequences; requires B == 1; the
    state resets (to initial_state[n] or zero) at every boundary.
    Returns o [T, B, H, D] in q's dtype, and the final state [N, H, D, D] fp32 if
    output_final_state.
    """
    backend = _resolve(q)
    if backend == "triton":
        from .triton_ops import lightning_attention_triton  # imports Triton only when used

        return lightning_attention_triton(q, k, v, slope, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state,
                                          cu_seqlens=cu_seqlens)
    if backend == "fla":
        return _fla(q, k, v, slope, scale, initial_state, output_final_state, cu_seqlens)
    return lightning_attention_chunked(q, k, v, slope, scale=scale, initial_state=initial_state,
                                       output_final_state=output_final_state,
                                       cu_seqlens=cu_seqlens)


def lightning_attention_decode(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, state: Tensor, *,
                               scale: Optional[float] = None) -> Tensor:
    """One generated token. q, k, v: [B, H, D]; slope: [H]; state: [B, H, D, D] fp32, updated in
    place to lambda * state + k^T v. Returns o = scale * q state [B, H, D] in q's dtype.
    Runs the Triton kernel where the backend resolves to triton, else PyTorch (fla-core has no
    decode step for this layout, so with fla selected the PyTorch step runs, and says so)."""
    backend = _resolve(q)
    if backend == "triton":
        from .triton_ops import lightning_attention_decode_triton

        return lightning_attention_decode_triton(q, k, v, slope, state, scale=scale)
    if backend == "fla":
        _log_once("decode", "fla", "lightning attention decode: fla selected; the PyTorch decode "
                  "step runs")
    return lightning_attention_decode_reference(q, k, v, slope, state, scale=scale)
