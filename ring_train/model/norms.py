"""RMSNorm variants of the Ring-linear model.

Both normalise in fp32 and multiply by the weight after casting back, as the HF Bailing models
do, so converted checkpoints see the same numerics.
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, computed in fp32, returned in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(MegatronModule):
    """RMSNorm over the last dim with a [hidden_size] weight.

    Under sequence parallelism each rank normalises its own slice of tokens, so the weight's
    gradient is partial: the `sequence_parallel` attribute makes megatron-core's
    `finalize_model_grads` all-reduce it over the tensor-parallel group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * rms_normalize(x, self.eps)


class GroupedRMSNorm(MegatronModule):
    """RMSNorm over groups of heads of the lightning output, local to a tensor-parallel rank.

    The [H*D] output is viewed as `group_norm_size` groups of whole heads; each group is
    normalised on its own and the [H*D] weight applies element-wise. Because
    `group_norm_size % tp == 0`, a rank's heads form whole groups: the norm needs no collective,
    and its weight is sharded along dim 0 like the heads.

    Args:
        hidden_size_per_partition: H*D / tp, this rank's output width.
        groups_per_partition: group_norm_size / tp.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size_per_partition: int,
        groups_per_partition: int,
        eps: float = 1e-6,
    ):
        super().__init__(config=config)
        if hidden_size_per_partition % groups_per_partition:
            raise ValueError(
                f"GroupedRMSNorm: width {hidden_size_per_partition} is not divisible by "
                f"{groups_per_partition} groups."
            )
        self.groups = groups_per_partition
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size_per_partition, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., H_local*D] -> same shape."""
        grouped = x.unflatten(-1, (self.groups, -1))
        return self.weight * rms_normalize(grouped, self.eps).flatten(-2)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0}, sharded_offsets
        )
