"""Split of the fused qkvg projection + SiLU + q/k RMSNorm + partial NeoX RoPE: one dispatch point.

Triton kernels (`triton_kernels.py`) run for CUDA tensors, or for CPU tensors under
TRITON_INTERPRET=1 (tests); anything else runs the PyTorch sequence in `reference.py`. The first
call on each path logs which path runs.
"""

from torch import Tensor

from kernels.triton_support import use_triton

from .reference import Freqs, qkvg_split_norm_rope_reference

__all__ = ["qkvg_split_norm_rope", "use_triton"]


def qkvg_split_norm_rope(qkvg: Tensor, q_weight: Tensor, k_weight: Tensor, freqs: Freqs, *,
                         eps: float, silu: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The lightning layer's prologue: fused projection output to attention inputs.

    qkvg: [s, b, H*4*D], each head's rows stored [q_h; k_h; v_h; g_h]; last dim unit-stride.
    q_weight, k_weight: [D] RMSNorm weights (per head, shared over heads).
    freqs: megatron's rotary_pos_emb, fp32 angles [s, 1 or b, 1, rotary_dim] (rotary_dim even,
        <= D), or a (q_freqs, k_freqs) pair, or None (no RoPE). rotary_dim = freqs.shape[-1].
    silu: apply SiLU to q, k, v first (config.linear_silu).
    Returns q, k, v, gate: contiguous [s, b, H, D] in qkvg's dtype, where
        q = rope(q_weight * rms_normalize(silu?(q_raw))), likewise k (rms in fp32, eps inside the
        root; rope rotates the first rotary_dim dims NeoX-style in qkvg's dtype, as megatron-core
        does), v = silu?(v_raw), gate = g_raw.
    Differentiable in qkvg, q_weight and k_weight.
    """
    if use_triton(qkvg, "qkvg_split_norm_rope"):
        from .triton_ops import qkvg_split_norm_rope_triton  # imports Triton only when used

        return qkvg_split_norm_rope_triton(qkvg, q_weight, k_weight, freqs, eps=eps, silu=silu)
    return qkvg_split_norm_rope_reference(qkvg, q_weight, k_weight, freqs, eps=eps, silu=silu)
