"""The unfused PyTorch sequence that `gated_group_rms_norm` replaces: the kernels' yardstick.

The lightning layer's output path, op for op (`GroupedRMSNorm` of ring_train/model/norms.py, then
the sigmoid gate): each group of whole heads is normalised in fp32 and cast back, times the
[H*D] weight, times sigmoid(gate), each op in the activations' dtype.
"""

import torch
from torch import Tensor

from kernels.qk_norm_rope.reference import rms_normalize


def gated_group_rms_norm_reference(o: Tensor, gate: Tensor, weight: Tensor, groups: int,
                                   eps: float) -> Tensor:
    """The contract of `kernels.gated_norm.gated_group_rms_norm`, in plain PyTorch."""
    s, b = o.shape[:2]
    x = o.reshape(s, b, -1)
    normed = weight * rms_normalize(x.unflatten(-1, (groups, -1)), eps).flatten(-2)
    return normed * torch.sigmoid(gate.reshape_as(x))
