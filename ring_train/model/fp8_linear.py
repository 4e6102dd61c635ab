"""megatron-core's tensor-parallel linear layers with FP8 GEMMs (kernels/fp8/linear.py).

Only the local GEMM changes: the layers keep megatron's parameters, initialisation, checkpoint
keys and tensor-parallel communication (all-gather / reduce-scatter under sequence parallelism,
all-reduce of the input gradient otherwise, taken from megatron's autograd mappings), so a run
can switch `compute.fp8` on or off between stages or resumes. The bf16 weight stays the
parameter the optimizer updates; its quantised form is cached between micro-batches until the
optimizer changes it. Under a delayed-scaling recipe each layer keeps its own amax histories
(not checkpointed: a resumed run restarts them with one current-scaled quantisation).

Unlike megatron's bf16 path, the input-gradient communication is not overlapped with the weight
gradient GEMM.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from torch import Tensor

from kernels.fp8.linear import WEIGHT_CACHE, DelayedScaling, fp8_linear


class _Fp8Gemm:
    """Replaces `_forward_impl`, the GEMM (+ input communication) of megatron's linear layers."""

    def _forward_impl(
        self,
        input: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        gradient_accumulation_fusion: bool,
        allreduce_dgrad: bool,
        sequence_parallel: bool,
        tp_group=None,
        **unused_deferred_wgrad_kwargs,
    ) -> Tensor:
        if gradient_accumulation_fusion:
            raise ValueError(
                "FP8 linear layers do not support gradient_accumulation_fusion (an apex "
                "extension); set it to False."
            )
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, group=tp_group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        recipe = self.config.linear_fp8_recipe
        output = fp8_linear(input, weight, recipe, cache=WEIGHT_CACHE,
                            delayed=self._delayed_scaling(recipe))
        return output if bias is None else output + bias

    def _delayed_scaling(self, recipe: str) -> Optional[DelayedScaling]:
        """This layer's amax histories under a delayed-scaling recipe (made on first use, kept
        across steps, restarted after a resume or a recipe change), else None."""
        state = self.__dict__.get("_fp8_delayed")
        if state is None or state[0] != recipe:
            state = (recipe, DelayedScaling.for_recipe(recipe))
            self.__dict__["_fp8_delayed"] = state
        return state[1]


class Fp8ColumnParallelLinear(_Fp8Gemm, ColumnParallelLinear):
    pass


class Fp8RowParallelLinear(_Fp8Gemm, RowParallelLinear):
    pass


def parallel_linear_classes(config) -> tuple[type, type]:
    """(column-parallel, row-parallel) linear classes for `config.linear_fp8_recipe`."""
    if getattr(config, "linear_fp8_recipe", None):
        return Fp8ColumnParallelLinear, Fp8RowParallelLinear
    return ColumnParallelLinear, RowParallelLinear
