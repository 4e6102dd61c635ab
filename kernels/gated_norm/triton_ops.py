"""Launchers and the autograd Function around the Triton gated grouped-RMSNorm kernels.

Public entry point: `gated_group_rms_norm_triton` (the contract of the dispatcher's
`gated_group_rms_norm`). The `launch_*` functions write into caller-given outputs, which lets
tests poison every output before a run.
"""

import dataclasses

import torch
import triton
from torch import Tensor

from kernels.triton_support import ROUND_CODES

from . import triton_kernels as K


@dataclasses.dataclass
class KernelConfig:
    """Launch parameters; benchmarks may replace `CONFIG` to tune (results do not depend on it).
    A program's tile is [elements / W tokens, W]: W = H*D/groups columns of one group."""
    # Fastest in a sweep on the H100 at Ring-mini shapes (8192 tokens, H*D = 2048, 4 groups):
    # small tiles, few warps, many programs resident per SM (backward 0.08 ms against 0.21 ms
    # at 2048 elements / 8 warps).
    fwd_elements: int = 1024
    fwd_warps: int = 2
    bwd_elements: int = 1024
    bwd_warps: int = 2
    # Backward programs per group: each sums its tokens' weight gradients into one fp32 partial.
    bwd_programs: int = 256


CONFIG = KernelConfig()


def _block_t(elements: int, block_w: int) -> int:
    return max(1, elements // block_w)


def launch_forward(o: Tensor, gate: Tensor, weight: Tensor, groups: int, eps: float,
                   y: Tensor) -> None:
    """Writes y (contiguous [N, H*D]). o: [N, H*D] with unit last stride; gate [s, b, H, D]."""
    s, b, H, D = gate.shape
    N, HD = o.shape
    W = HD // groups
    block_w = triton.next_power_of_2(W)
    block_t = _block_t(CONFIG.fwd_elements, block_w)
    K.gated_norm_fwd_kernel[(triton.cdiv(N, block_t), groups)](
        o, gate, weight, y, N, b, o.stride(0), *gate.stride()[:3], HD, eps, D=D, W=W,
        BLOCK_T=block_t, BLOCK_W=block_w, ROUND=ROUND_CODES[o.dtype],
        num_warps=CONFIG.fwd_warps)


def launch_backward(o: Tensor, gate: Tensor, weight: Tensor, groups: int, eps: float, dy: Tensor,
                    do: Tensor, dgate: Tensor) -> Tensor:
    """Writes do and dgate (contiguous [N, H*D]) from dy (contiguous [N, H*D]); returns the fp32
    weight gradient [H*D]."""
    s, b, H, D = gate.shape
    N, HD = o.shape
    W = HD // groups
    block_w = triton.next_power_of_2(W)
    block_t = _block_t(CONFIG.bwd_elements, block_w)
    blocks = triton.cdiv(N, block_t)
    iters = triton.cdiv(blocks, min(blocks, CONFIG.bwd_programs))
    programs = triton.cdiv(blocks, iters)
    dw = torch.empty(programs, HD, dtype=torch.float32, device=o.device)
    K.gated_norm_bwd_kernel[(programs, groups)](
        o, gate, weight, dy, do, dgate, dw, N, b, iters, o.stride(0), *gate.stride()[:3], HD, eps,
        D=D, W=W, BLOCK_T=block_t, BLOCK_W=block_w, ROUND=ROUND_CODES[o.dtype],
        num_warps=CONFIG.bwd_warps)
    return dw.sum(0)


class GatedNormFunction(torch.autograd.Function):
    """(o [N, H*D], gate [s, b, H, D], weight) -> y [N, H*D]; gradients for all three."""

    @staticmethod
    def forward(ctx, o, gate, weight, groups, eps):
        y = torch.empty(o.shape, dtype=o.dtype, device=o.device)
        launch_forward(o, gate, weight, groups, eps, y)
        ctx.save_for_backward(o, gate, weight)
        ctx.groups, ctx.eps = groups, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        o, gate, weight = ctx.saved_tensors
        do = torch.empty(o.shape, dtype=o.dtype, device=o.device)
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        dw = launch_backward(o, gate, weight, ctx.groups, ctx.eps, dy.contiguous(), do, dgate)
        return do, dgate, dw.to(weight.dtype), None, None


def gated_group_rms_norm_triton(o: Tensor, gate: Tensor, weight: Tensor, groups: int,
                                eps: float) -> Tensor:
    """Triton gated grouped RMSNorm; the contract of `kernels.gated_norm`."""
    s, b = o.shape[:2]
    HD = weight.numel()
    if o.shape[2:].numel() != HD or gate.shape[:2] != (s, b) or gate.shape[2:].numel() != HD:
        raise ValueError(f"o and gate must be [s, b, H, D] or [s, b, H*D] with H*D = "
                         f"weight.numel() = {HD}; got o {tuple(o.shape)}, gate "
                         f"{tuple(gate.shape)}")
    if HD % groups:
        raise ValueError(f"width H*D = {HD} is not divisible by {groups} groups")
    if gate.dim() == 3:  # [s, b, H*D]: one head of width W per group is as good as any split
        gate = gate.unflatten(-1, (groups, HD // groups))
    if o.dtype not in ROUND_CODES or gate.dtype != o.dtype:
        raise ValueError(f"o and gate must share one dtype of fp32, bf16, fp16; got {o.dtype}, "
                         f"{gate.dtype}")
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    o2 = o.reshape(s * b, HD)
    if o2.stride(-1) != 1:
        o2 = o2.contiguous()
    y = GatedNormFunction.apply(o2, gate, weight.contiguous(), groups, eps)
    return y.view(s, b, HD)
