"""Plain PyTorch lightning attention: the chunked form (the CPU path) and the recurrent definition.

Lightning attention (simple GLA with a per-head constant decay), per head h with
lambda_h = exp(-slope[h]) and an fp32 state S in R^{D_k x D_v}:

    S_t = lambda_h * S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t.

The chunked form splits every sequence into chunks of C tokens. Inside a chunk the output is the
masked quadratic form (q k^T * M) v with M[i, j] = lambda^(i - j) for i >= j; the state entering
the chunk adds (q * lambda^(i + 1)) S; and the state leaving it is
lambda^C S + (k * lambda^(C - 1 - j))^T v. Every decay factor is a non-positive power of lambda, so
nothing overflows for any positive slope.

Packed sequences (cu_seqlens) are laid out so that every document starts on a chunk boundary
(the tail of its last chunk is zero padding); the state then simply restarts at the first chunk of
each document, and all documents share one loop over chunks.
"""

from typing import Optional

import torch
from torch import Tensor

CHUNK_SIZE = 64


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, initial_state: Optional[Tensor],
                  cu_seqlens: Optional[Tensor]) -> int:
    """Validates shapes and returns N, the number of sequences."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be [T, B, H, D] with equal T, B, H; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    T, B, H, _ = q.shape
    if slope.shape != (H,):
        raise ValueError(f"slope must be [H] = [{H}], got {tuple(slope.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (packed sequences), got B = {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [N + 1] of document boundaries")
        n = cu_seqlens.numel() - 1
    else:
        n = B
    if initial_state is not None and initial_state.shape != (n, H, q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must be [N, H, D_k, D_v] = [{n}, {H}, {q.shape[-1]}, "
                         f"{v.shape[-1]}], got {tuple(initial_state.shape)}")
    return n


def _boundaries(cu_seqlens: Optional[Tensor], T: int, B: int) -> list[int]:
    """Document boundaries as Python ints; without cu_seqlens each batch row is one sequence."""
    if cu_seqlens is None:
        return [0, T]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != T or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
    return bounds


def lightning_attention_chunked(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, *,
                                scale: Optional[float] = None,
                                initial_state: Optional[Tensor] = None,
                                output_final_state: bool = False,
                                cu_seqlens: Optional[Tensor] = None,
                                chunk_size: int = CHUNK_SIZE) -> tuple[Tensor, Optional[Tensor]]:
    """Chunked lightning attention in fp32; differentiable through autograd.

    q, k: [T, B, H, D_k]; v: [T, B, H, D_v]; slope: [H] (decay per step is exp(-slope));
    initial_state: [N, H, D_k, D_v] fp32; cu_seqlens: [N + 1] with B == 1.
    Returns o [T, B, H, D_v] in q's dtype and, if output_final_state, the final state
    [N, H, D_k, D_v] fp32.
    """
    _check_inputs(q, k, v, slope, initial_state, cu_seqlens)
    T, B, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    bounds = _boundaries(cu_seqlens, T, B)

    # [R, H, T, D] fp32 with R rows that run side by side: the batch, or the one packed row.
    qf, kf, vf = (x.float().permute(1, 2, 0, 3) for x in (q, k, v))
    qf = qf * scale
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    n_chunks = [-(-n // C) for n in lengths]  # chunks of each document, ceil(n / C)
    P = sum(n_chunks) * C  # padded length of a row
    if cu_seqlens is None:
        pad = P - T
        qf, kf, vf = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
    else:
        # Gather every document into its own run of whole chunks; index T reads a zero row.
        src = torch.full((P,), T, dtype=torch.long)
        dst = torch.empty(T, dtype=torch.long)  # padded position of each real token
        offset = 0
        for start, n, nc in zip(bounds[:-1], lengths, n_chunks):
            src[offset:offset + n] = torch.arange(start, start + n)
            dst[start:start + n] = torch.arange(offset, offset + n)
            offset += nc * C
        src, dst = src.to(q.device), dst.to(q.device)
        qf, kf, vf = (torch.nn.functional.pad(x, (0, 0, 0, 1)).index_select(2, src)
                      for x in (qf, kf, vf))
    R = qf.shape[0]
    NC = P // C
    qc, kc, vc = (x.reshape(R, H, NC, C, x.shape[-1]) for x in (qf, kf, vf))

    s = slope.float().to(q.device).view(H, 1)
    pos = torch.arange(C, device=q.device, dtype=torch.float32)
    diff = pos.view(C, 1) - pos.view(1, C)
    mask = torch.exp(-s.view(H, 1, 1) * diff.clamp(min=0)) * (diff >= 0)  # [H, C, C]
    q_decay = torch.exp(-s * (pos + 1)).view(1, H, 1, C, 1)  # state entering chunk -> row i
    k_decay = torch.exp(-s * (C - 1 - pos)).view(1, H, 1, C, 1)  # column j -> state leaving chunk
    chunk_decay = torch.exp(-s * C).view(1, H, 1, 1)

    attn = (qc @ kc.transpose(-1, -2)) * mask.view(1, H, 1, C, C)
    o = attn @ vc
    state_inc = (kc * k_decay).transpose(-1, -2) @ vc  # [R, H, NC, D_k, D_v]

    # Sequential over chunks only: the state entering each chunk.
    first_chunk = {}  # chunk index -> document starting there
    c = 0
    for n, nc in enumerate(n_chunks):
        if nc:
            first_chunk[c] = n
        c += nc
    zero = qf.new_zeros(R, H, Dk, Dv)
    init = initial_state.float() if initial_state is not None else None
    states = []
    S = zero
    for c in range(NC):
        if c in first_chunk:
            n = first_chunk[c]
            S = zero if init is None else (init if cu_seqlens is None else init[n:n + 1])
        states.append(S)
        S = chunk_decay * S + state_inc[:, :, c]
    S_in = torch.stack(states, dim=2)  # [R, H, NC, D_k, D_v]
    o = o + (qc * q_decay) @ S_in
    o = o.reshape(R, H, P, Dv)
    o = o[:, :, :T] if cu_seqlens is None else o.index_select(2, dst)
    o = o.permute(2, 0, 1, 3).to(q.dtype)

    if not output_final_state:
        return o, None
    finals = []
    c = 0
    for n, (length, nc) in enumerate(zip(lengths, n_chunks)):
        if nc == 0:  # empty document: its state passes through unchanged
            finals.append(zero[:1] if init is None else init[n:n + 1])
            continue
        last = c + nc - 1
        L = length - (nc - 1) * C  # real tokens in the document's last chunk
        # Decay to the last real token; padded keys are zero, so the clamp only avoids inf * 0.
        tail = torch.exp(-s * (L - 1 - pos).clamp(min=0)).view(1, H, C, 1)
        rows = slice(None) if cu_seqlens is None else slice(0, 1)
        S_last = torch.exp(-s * L).view(1, H, 1, 1) * states[last][rows]
        finals.append(S_last + (kc[rows, :, last] * tail).transpose(-1, -2) @ vc[rows, :, last])
        c += nc
    final = torch.cat(finals, dim=0) if cu_seqlens is not None else finals[0]
    return o, final


def lightning_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, slope: Tensor, *,
                                  scale: Optional[float] = None,
                                  initial_state: Optional[Tensor] = None,
                                  output_final_state: bool = False,
                                  cu_seqlens: Optional[Tensor] = None
                                  ) -> tuple[Tensor, Optional[Tensor]]:
    """The definition, one token at a time (slow; tests only). Same shapes as the chunked form."""
    _check_inputs(q, k, v, slope, initial_state, cu_seqlens)
    T, B, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    bounds = _boundaries(cu_seqlens, T, B)
    decay = torch.exp(-slope.float()).view(1, H, 1, 1)
    outs, finals = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        # Without cu_seqlens there is one "document" per call, all B rows at once.
        S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32)
        if initial_state is not None:
            S = initial_state.float() if cu_seqlens is None else initial_state[n:n + 1].float()
        for t in range(start, end):
            kt, vt = k[t].float(), v[t].float()
            S = decay * S + kt.unsqueeze(-1) * vt.unsqueeze(-2)
            outs.append(scale * (q[t].float().unsqueeze(-2) @ S).squeeze(-2))
        finals.append(S)
    o = torch.stack(outs, dim=0).to(q.dtype) if outs else q.new_empty(0, B, H, Dv)
    if not output_final_state:
        return o, None
    return o, torch.cat(finals, dim=0)


def lightning_attention_decode_reference(q: Tensor, k: Tensor, v: Tensor, slope: Tensor,
                                         state: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """One decode step. q, k: [B, H, D_k]; v: [B, H, D_v]; state: [B, H, D_k, D_v] fp32, updated
    in place to lambda * state + k^T v. Returns o = scale * q state' [B, H, D_v] in q's dtype."""
    H, Dk = q.shape[1], q.shape[2]
    scale = Dk ** -0.5 if scale is None else scale
    decay = torch.exp(-slope.float().to(state.device)).view(1, H, 1, 1)
    state.mul_(decay).add_(k.float().unsqueeze(-1) * v.float().unsqueeze(-2))
    return (scale * (q.float().unsqueeze(-2) @ state).squeeze(-2)).to(q.dtype)
