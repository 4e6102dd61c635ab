"""Launchers and the autograd Function around the Triton lightning attention kernels.

Public entry points: `lightning_attention_triton` (same contract as the dispatcher's
`lightning_attention`) and `lightning_attention_decode_triton`. The `launch_*` functions write into
caller-given outputs, which lets tests poison every output before a run.
"""

import dataclasses
import functools
import math
from typing import Optional

import torch
from torch import Tensor

from kernels.triton_support import interpreting, sm_count

from . import triton_kernels as K

CHUNK = 64  # tokens per chunk (BT): the intra-chunk quadratic form is CHUNK x CHUNK


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters (measured choices: benchmarks/NOTES_lightning_attention.md). Benchmarks
    may replace `CONFIG` to tune; results do not depend on it."""
    fwd_block_v: int = 64  # state columns per forward program
    # 4 warps spill a few registers (64 B of stack at D = 128) but fit 2 programs per SM, which
    # beat 8 warps at 1 per SM by 1.4x on an H100 (same stages).
    fwd_warps: int = 4
    fwd_stages: int = 3
    bwd_block: int = 64  # state rows (dq, dk roles) or columns (dv role) per backward program
    bwd_warps: int = 8  # no spills; 4 warps spill and measured slower
    bwd_stages: int = 3
    inc_warps: int = 4
    # Long, few sequences are cut into segments so that the forward programs fill about `waves`
    # programs per SM (one full wave at 2 programs per SM: more programs than slots cost a whole
    # extra sweep); a segment is never shorter than min_segment tokens.
    waves: float = 2.0
    min_segment: int = 1024


CONFIG = KernelConfig()


def _fp32_dot(x: Tensor) -> bool:
    """Upcast dot operands: for fp32 inputs, and in Triton's interpreter (its bf16 dot is wrong)."""
    return interpreting() or x.dtype == torch.float32


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """How the sequences are cut into segments (see triton_kernels): `table` [S, 5] int32 rows
    (row, t_start, t_end, seq, flags) and `seq_segs` [N + 1] int32 (segments of sequence n are
    seq_segs[n]:seq_segs[n+1]), both on the device."""
    table: Tensor
    seq_segs: Tensor
    num_segments: int
    num_seqs: int
    split: bool  # some sequence has more than one segment


@functools.lru_cache(maxsize=64)
def _plan(rows_and_bounds: tuple, seg_len: int, device: torch.device) -> SegmentPlan:
    table, seq_segs = [], [0]
    for n, (row, start, end) in enumerate(rows_and_bounds):
        cuts = list(range(start, end, seg_len)) or [start]  # an empty sequence keeps one segment
        for i, t0 in enumerate(cuts):
            t1 = min(t0 + seg_len, end)
            flags = (K.FIRST if i == 0 else 0) | (K.LAST if i == len(cuts) - 1 else 0)
            table.append((row, t0, t1, n, flags))
        seq_segs.append(len(table))
    as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return SegmentPlan(as_tensor(table).view(-1, K.SEG_COLS), as_tensor(seq_segs), len(table),
                       len(rows_and_bounds), len(table) > len(rows_and_bounds))


def plan_segments(T: int, B: int, H: int, D: int, cu_seqlens: Optional[Tensor],
                  device: torch.device, segment_len: Optional[int] = None) -> SegmentPlan:
    """Segments for B rows of T tokens, or for the documents of cu_seqlens (B == 1; this reads
    cu_seqlens on the host). segment_len (a multiple of CHUNK) overrides the heuristic."""
    if cu_seqlens is None:
        seqs = tuple((b, 0, T) for b in range(B))
    else:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != T or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
        seqs = tuple((0, a, b) for a, b in zip(bounds[:-1], bounds[1:]))
    if segment_len is None:
        segment_len = _segment_len(T * B, len(seqs), H, D, device)
    if segment_len % CHUNK:
        raise ValueError(f"segment_len must be a multiple of {CHUNK}, got {segment_len}")
    return _plan(seqs, segment_len, device)


def _segment_len(tokens: int, num_seqs: int, H: int, D: int, device: torch.device) -> int:
    sms = sm_count(device) if device.type == "cuda" else 1
    blocks = max(1, D // CONFIG.fwd_block_v)  # forward programs per (segment, head)
    wanted = max(1, math.floor(CONFIG.waves * sms / (H * blocks)))  # segments that fill the GPU
    if wanted < 1.5 * num_seqs:  # cutting would add the extra launches for little parallelism
        return -(-max(tokens, 1) // CHUNK) * CHUNK  # no cut
    seg = -(-tokens // (wanted * CHUNK)) * CHUNK  # equal cuts, rounded up to whole chunks
    return max(seg, CONFIG.min_segment)


def _check(q: Tensor, k: Tensor, v: Tensor, slope: Tensor) -> None:
    T, B, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [T, B, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"head dim D must be a power of two in [16, 256], got {D}")
    if slope.shape != (H,):
        raise ValueError(f"slope must be [H] = [{H}], got {tuple(slope.shape)}")


def _shared_strides(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v with one set of strides and a unit last stride (slices of a fused QKV output
    already share them; anything else is copied)."""
    if q.stride(-1) == 1 and q.stride() == k.stride() == v.stride():
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _state_args(x: Optional[Tensor], like: Tensor) -> Tensor:
    """An fp32 contiguous state tensor, or a placeholder pointer when absent."""
    return like if x is None else x.float().contiguous()


def launch_forward(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, scale: float,
                   h0: Optional[Tensor], plan: SegmentPlan, o: Tensor,
                   ht: Optional[Tensor]) -> Optional[Tensor]:
    """Writes o [T, B, H, D] and, if given, ht [N, H, D, D] fp32. q, k, v share strides.
    Returns the states entering each segment [S, H, D, D] fp32 when the plan splits (the
    backward needs them), else None."""
    T, B, H, D = q.shape
    fp32_dot = _fp32_dot(q)
    cfg = CONFIG
    bv = min(cfg.fwd_block_v, D)
    s_in = None
    if plan.split:
        s_in = _segment_states(k, v, slope, 1.0, h0, plan, D, bv, False, cfg.fwd_stages)
    dummy = slope  # never read: the matching constexpr flag is off
    K.fwd_kernel[(D // bv, H, plan.num_segments)](
        q, k, v, o, slope, plan.table, dummy if s_in is None else s_in,
        _state_args(h0, dummy), dummy if ht is None else ht, *q.stride()[:3], *o.stride()[:3],
        scale, H, BT=CHUNK, DK=D, DV=D, BV=bv, SPLIT=plan.split, HAS_H0=h0 is not None,
        STORE_HT=ht is not None, FP32_DOT=fp32_dot, num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages)
    return s_in


def _segment_states(x: Tensor, y: Tensor, slope: Tensor, scale: float, init: Optional[Tensor],
                    plan: SegmentPlan, bk: int, bv: int, reverse: bool, stages: int) -> Tensor:
    """[S, H, D, D] fp32 states at segment boundaries: forward (x, y = k, v; init = h0) the state
    entering each segment; reverse (x, y = q, do; init = d final state) the gradient of the
    state leaving each segment. Two launches: per-segment increments, then a scan per sequence."""
    H, D = x.shape[2], x.shape[3]
    delta = x.new_empty(plan.num_segments, H, D, D, dtype=torch.float32)
    K.state_increment_kernel[((D // bk) * (D // bv), H, plan.num_segments)](
        x, y, delta, slope, plan.table, *x.stride()[:3], *y.stride()[:3], scale, H, BT=CHUNK,
        DK=D, DV=D, BK=bk, BV=bv, REVERSE=reverse, FP32_DOT=_fp32_dot(x),
        num_warps=CONFIG.inc_warps, num_stages=stages)
    out = torch.empty_like(delta)
    block = min(1024, D * D)
    K.segment_scan_kernel[(D * D // block, H, plan.num_seqs)](
        delta, out, _state_args(init, delta), slope, plan.table, plan.seq_segs, H, DKV=D * D,
        BLOCK=block, REVERSE=reverse, HAS_INIT=init is not None, num_warps=4)
    return out


def launch_backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor, slope: Tensor, scale: float,
                    h0: Optional[Tensor], s_in: Optional[Tensor], dht: Optional[Tensor],
                    plan: SegmentPlan, dq: Tensor, dk: Tensor, dv: Tensor,
                    dh0: Optional[Tensor]) -> None:
    """Writes dq, dk, dv [T, B, H, D] (one set of strides) and, if given, dh0 [N, H, D, D] fp32.
    s_in: what launch_forward returned for this plan; dht: gradient of the final state or None."""
    T, B, H, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    fp32_dot = _fp32_dot(q)
    cfg = CONFIG
    bk = min(cfg.bwd_block, D)
    r_out = None
    if plan.split:
        r_out = _segment_states(q, do, slope, scale, dht, plan, bk, bk, True, cfg.bwd_stages)
    dummy = slope
    K.bwd_kernel[(2 * (D // bk) + D // bk, H, plan.num_segments)](
        q, k, v, do, dq, dk, dv, slope, plan.table, dummy if s_in is None else s_in,
        _state_args(h0, dummy), dummy if r_out is None else r_out, _state_args(dht, dummy),
        dummy if dh0 is None else dh0, *q.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        scale, H, BT=CHUNK, DK=D, DV=D, BK=bk, BV=bk, SPLIT=plan.split,
        HAS_H0=h0 is not None, HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        FP32_DOT=fp32_dot, num_warps=cfg.bwd_warps, num_stages=cfg.bwd_stages)


class LightningAttentionFunction(torch.autograd.Function):
    """Forward and backward Triton kernels; slope is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, slope, scale, h0, output_final_state, plan):
        T, B, H, D = q.shape
        o = torch.empty(T, B, H, D, dtype=q.dtype, device=q.device)
        ht = (q.new_empty(plan.num_seqs, H, D, D, dtype=torch.float32)
              if output_final_state else None)
        s_in = launch_forward(q, k, v, slope, scale, h0, plan, o, ht)
        ctx.save_for_backward(q, k, v, slope, h0, s_in)
        ctx.scale, ctx.plan = scale, plan
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, slope, h0, s_in = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(q)
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        dh0 = (torch.empty(h0.shape, dtype=torch.float32, device=h0.device)
               if h0 is not None else None)
        launch_backward(q, k, v, do, slope, ctx.scale, h0, s_in,
                        None if dht is None else dht.float().contiguous(), ctx.plan, dq, dk, dv,
                        dh0)
        dh0 = None if dh0 is None else dh0.to(h0.dtype)
        return dq, dk, dv, None, None, dh0, None, None


def lightning_attention_triton(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, *,
                               scale: Optional[float] = None,
                               initial_state: Optional[Tensor] = None,
                               output_final_state: bool = False,
                               cu_seqlens: Optional[Tensor] = None,
                               segment_len: Optional[int] = None
                               ) -> tuple[Tensor, Optional[Tensor]]:
    """Triton lightning attention; the contract of `kernels.lightning_attention` (q, k, v share
    one shape [T, B, H, D], D a power of two in [16, 256]). segment_len forces how sequences are
    cut for parallelism (tests); by default it follows the GPU's size."""
    _check(q, k, v, slope)
    T, B, H, D = q.shape
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs B == 1 (packed sequences), got B = {B}")
    q, k, v = _shared_strides(q, k, v)
    plan = plan_segments(T, B, H, D, cu_seqlens, q.device, segment_len)
    if initial_state is not None and initial_state.shape != (plan.num_seqs, H, D, D):
        raise ValueError(f"initial_state must be [N, H, D, D] = [{plan.num_seqs}, {H}, {D}, {D}], "
                         f"got {tuple(initial_state.shape)}")
    scale = D ** -0.5 if scale is None else scale
    slope = slope.float().contiguous()
    return LightningAttentionFunction.apply(q, k, v, slope, scale, initial_state,
                                            output_final_state, plan)


def launch_decode(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, state: Tensor, scale: float,
                  o: Tensor) -> None:
    """Writes o [B, H, D] and updates state [B, H, D, D] fp32 (contiguous) in place."""
    B, H, D = q.shape
    bv = min(64, D)
    K.decode_kernel[(D // bv, H, B)](q, k, v, o, slope, state, q.stride(0), q.stride(1),
                                     o.stride(0), o.stride(1), scale, H, DK=D, DV=D, BV=bv,
                                     num_warps=4)


def lightning_attention_decode_triton(q: Tensor, k: Tensor, v: Tensor, slope: Tensor,
                                      state: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """One token, as `kernels.lightning_attention.lightning_attention_decode`."""
    B, H, D = q.shape
    if k.shape != q.shape or v.shape != q.shape or state.shape != (B, H, D, D):
        raise ValueError(f"decode needs q, k, v [B, H, D] and state [B, H, D, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(state.shape)}")
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("decode state must be a contiguous fp32 tensor (it is updated in place)")
    q, k, v = _shared_strides(q, k, v)
    o = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    scale = D ** -0.5 if scale is None else scale
    launch_decode(q, k, v, slope.float().contiguous(), state, scale, o)
    return o
