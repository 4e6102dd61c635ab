"""Grouped RMSNorm of the lightning output times sigmoid(gate): one dispatch point.

Triton kernels (`triton_kernels.py`) run for CUDA tensors, or for CPU tensors under
TRITON_INTERPRET=1 (tests); anything else runs the PyTorch sequence in `reference.py`. The first
call on each path logs which path runs.
"""

from torch import Tensor

from kernels.triton_support import use_triton

from .reference import gated_group_rms_norm_reference

__all__ = ["gated_group_rms_norm"]


def gated_group_rms_norm(o: Tensor, gate: Tensor, weight: Tensor, groups: int,
                         eps: float) -> Tensor:
    """GroupedRMSNorm(o) * sigmoid(gate), the lightning layer's output path.

    o: [s, b, H, D] or [s, b, H*D] (the attention output); gate: [s, b, H, D] or [s, b, H*D],
        any strides with a unit last one; both in one dtype.
    weight: [H*D]; groups: the number of groups of whole heads (group_norm_size / tp).
    Returns [s, b, H*D] in o's dtype: each group of H*D/groups columns normalised over itself
    (fp32, eps inside the root, cast back), times weight, times sigmoid(gate), each product in
    o's dtype as the unfused PyTorch path computes it. Differentiable in o, gate and weight.
    """
    if use_triton(o, "gated_group_rms_norm"):
        from .triton_ops import gated_group_rms_norm_triton  # imports Triton only when used

        return gated_group_rms_norm_triton(o, gate, weight, groups, eps)
    return gated_group_rms_norm_reference(o, gate, weight, groups, eps)
