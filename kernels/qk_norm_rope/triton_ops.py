"""Launchers and the autograd Function around the Triton split + qk-norm + RoPE kernels.

Public entry point: `qkvg_split_norm_rope_triton` (the contract of the dispatcher's
`qkvg_split_norm_rope`). The `launch_*` functions write into caller-given outputs, which lets
tests poison every output before a run.
"""

import dataclasses

import torch
import triton
from torch import Tensor

from kernels.triton_support import ROUND_CODES

from . import triton_kernels as K
from .reference import QKVG, Freqs, split_freqs


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters; benchmarks may replace `CONFIG` to tune (results do not depend on it)."""
    fwd_block_t: int = 16  # tokens per forward program (all four rows of one head)
    fwd_warps: int = 4
    bwd_block_t: int = 16
    bwd_warps: int = 4
    # Backward programs per head: each sums its tokens' weight gradients into one fp32 partial.
    bwd_programs: int = 128


CONFIG = KernelConfig()



@dataclasses.dataclass(frozen=True)
class Rope:
    """cos and sin tables [s, 1 or b, rot] in the activations' dtype (what megatron multiplies
    by), for q and for k; `rot` = 0 without RoPE (the tables are then placeholders)."""
    q_cos: Tensor
    q_sin: Tensor
    k_cos: Tensor
    k_sin: Tensor
    rot: int

    def strides(self, b: int) -> tuple[int, int, int, int]:
        """(stride_s, stride_b) of the q tables, then of the k tables; 0 where broadcast."""
        if not self.rot:
            return 0, 0, 0, 0
        out = []
        for table in (self.q_cos, self.k_cos):
            out += [table.stride(0), table.stride(1) if table.shape[1] == b and b > 1 else 0]
        return tuple(out)


def rope_tables(freqs: Freqs, s: int, b: int, D: int, dtype: torch.dtype,
                placeholder: Tensor) -> Rope:
    """The cos/sin tables of megatron's rotary_pos_emb (a tensor, or a (q, k) pair) of fp32
    angles [s, 1 or b, 1, rot]; cos and sin are taken in fp32 and cast to `dtype`, as
    megatron-core's `_apply_rotary_pos_emb_bshd` does."""
    q_freqs, k_freqs = split_freqs(freqs)
    if q_freqs is None:
        return Rope(placeholder, placeholder, placeholder, placeholder, 0)
    tables = []
    for f in (q_freqs, k_freqs):
        if f.dim() != 4 or f.shape[0] != s or f.shape[1] not in (1, b) or f.shape[2] != 1:
            raise ValueError(f"rotary freqs must be [s, 1 or b, 1, rotary_dim] with s = {s}, "
                             f"b = {b}; got {tuple(f.shape)}")
        if f.shape[3] != q_freqs.shape[3] or f.shape[3] % 2 or f.shape[3] > D:
            raise ValueError(f"rotary_dim must be even, <= head dim {D} and the same for q and "
                             f"k; got {f.shape[3]} and {q_freqs.shape[3]}")
        if f is q_freqs and tables:  # one table for both (the layer passes one tensor)
            tables += tables
        else:
            f = f[:, :, 0, :]
            tables += [torch.cos(f).to(dtype).contiguous(), torch.sin(f).to(dtype).contiguous()]
    return Rope(*tables, rot=q_freqs.shape[3])


def _meta(D: int, rot: int, dtype: torch.dtype) -> dict:
    half = rot // 2
    return dict(D=D, HALF=half, ROT=rot, BLOCK_HALF=triton.next_power_of_2(max(half, 1)),
                BLOCK_PASS=triton.next_power_of_2(max(D - rot, 1)),
                BLOCK_D=triton.next_power_of_2(D), ROUND=ROUND_CODES[dtype])


def launch_forward(qkvg: Tensor, q_weight: Tensor, k_weight: Tensor, rope: Rope, eps: float,
                   silu: bool, q: Tensor, k: Tensor, v: Tensor, gate: Tensor) -> None:
    """Writes q, k, v, gate (contiguous [s, b, H, D]). qkvg: [s, b, H*4*D], unit last stride."""
    s, b, H, D = q.shape
    N = s * b
    cfg = CONFIG
    grid = (triton.cdiv(N, cfg.fwd_block_t), H)
    K.split_norm_rope_fwd_kernel[grid](
        qkvg, q_weight, k_weight, rope.q_cos, rope.q_sin, rope.k_cos, rope.k_sin, q, k, v, gate,
        N, b, H, qkvg.stride(0), qkvg.stride(1), *rope.strides(b), eps,
        BLOCK_T=cfg.fwd_block_t, SILU=silu, **_meta(D, rope.rot, qkvg.dtype),
        num_warps=cfg.fwd_warps)


def launch_backward(qkvg: Tensor, q_weight: Tensor, k_weight: Tensor, rope: Rope, eps: float,
                    silu: bool, dq: Tensor, dk: Tensor, dv: Tensor, dgate: Tensor,
                    dqkvg: Tensor) -> tuple[Tensor, Tensor]:
    """Writes dqkvg (contiguous [s, b, H*4*D]) from the contiguous output gradients; returns the
    fp32 gradients of q_weight and k_weight [D]."""
    s, b, H, D = dq.shape
    N = s * b
    cfg = CONFIG
    blocks = triton.cdiv(N, cfg.bwd_block_t)
    iters = triton.cdiv(blocks, min(blocks, cfg.bwd_programs))
    programs = triton.cdiv(blocks, iters)
    dw = torch.empty(2, programs * H, D, dtype=torch.float32, device=qkvg.device)
    K.split_norm_rope_bwd_kernel[(programs, H)](
        qkvg, q_weight, k_weight, rope.q_cos, rope.q_sin, rope.k_cos, rope.k_sin,
        dq, dk, dv, dgate, dqkvg, dw, N, b, H, iters, qkvg.stride(0), qkvg.stride(1),
        *rope.strides(b), eps, BLOCK_T=cfg.bwd_block_t, SILU=silu,
        **_meta(D, rope.rot, qkvg.dtype), num_warps=cfg.bwd_warps)
    dw = dw.sum(1)
    return dw[0], dw[1]


class SplitNormRopeFunction(torch.autograd.Function):
    """qkvg -> (q, k, v, gate); gradients for qkvg and both norm weights (rope is a constant)."""

    @staticmethod
    def forward(ctx, qkvg, q_weight, k_weight, rope, eps, silu):
        s, b, width = qkvg.shape
        D = q_weight.numel()
        q, k, v, gate = (torch.empty(s, b, width // (QKVG * D), D, dtype=qkvg.dtype,
                                     device=qkvg.device) for _ in range(4))
        launch_forward(qkvg, q_weight, k_weight, rope, eps, silu, q, k, v, gate)
        ctx.save_for_backward(qkvg, q_weight, k_weight)
        ctx.rope, ctx.eps, ctx.silu = rope, eps, silu
        return q, k, v, gate

    @staticmethod
    def backward(ctx, dq, dk, dv, dgate):
        qkvg, q_weight, k_weight = ctx.saved_tensors
        dqkvg = torch.empty(qkvg.shape, dtype=qkvg.dtype, device=qkvg.device)
        dq_w, dk_w = launch_backward(qkvg, q_weight, k_weight, ctx.rope, ctx.eps, ctx.silu,
                                     dq.contiguous(), dk.contiguous(), dv.contiguous(),
                                     dgate.contiguous(), dqkvg)
        return dqkvg, dq_w.to(q_weight.dtype), dk_w.to(k_weight.dtype), None, None, None


def qkvg_split_norm_rope_triton(qkvg: Tensor, q_weight: Tensor, k_weight: Tensor, freqs: Freqs,
                                *, eps: float, silu: bool = False
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton split + qk-norm + RoPE; the contract of `kernels.qk_norm_rope`."""
    s, b, width = qkvg.shape
    D = q_weight.numel()
    if k_weight.shape != (D,) or q_weight.shape != (D,) or width % (QKVG * D):
        raise ValueError(f"qkvg [s, b, H*4*D] needs q_weight, k_weight [D]; got qkvg "
                         f"{tuple(qkvg.shape)}, weights {tuple(q_weight.shape)}, "
                         f"{tuple(k_weight.shape)}")
    if qkvg.dtype not in ROUND_CODES:
        raise ValueError(f"qkvg must be fp32, bf16 or fp16, got {qkvg.dtype}")
    if qkvg.stride(-1) != 1:
        qkvg = qkvg.contiguous()
    rope = rope_tables(freqs, s, b, D, qkvg.dtype, q_weight)
    return SplitNormRopeFunction.apply(qkvg, q_weight.contiguous(), k_weight.contiguous(), rope,
                                       eps, silu)
