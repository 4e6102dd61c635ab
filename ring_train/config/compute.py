"""How the model computes, as opposed to what it computes: GEMM precision, fused kernels and
recomputation. None of these change the weights or the checkpoint format, so a run can switch
them between stages or resumes (e.g. FP8 checkpoints load into bf16 runs and back)."""

from __future__ import annotations

from dataclasses import dataclass

from ring_train.config.errors import ConfigError

# FP8 GEMM recipes of the linear layers (kernels/fp8/linear.py has the GEMM each one runs):
#   blockwise   activations/gradients 1x128, weights 128x128 tiles (linghe, Ling 2.0)
#   rowwise     one scale per row of each operand
#   tensorwise  one scale per tensor
#   tensorwise_delayed  tensorwise, activations and gradients scaled from the amaxes of their
#               layer's previous 16 tensors (one read instead of two per quantisation)
FP8_RECIPES = ("none", "blockwise", "rowwise", "tensorwise", "tensorwise_delayed")


@dataclass
class ComputeConfig:
    # FP8 for the QKV/gate, output, dense MLP, shared- and routed-expert GEMMs; bf16 master
    # weights stay with the optimizer. Embedding, output layer and router stay in bf16/fp32.
    fp8: str = "none"
    # With fp8: the routed experts' grouped GEMMs in FP8 too (rowwise, torch._scaled_grouped_mm),
    # or false: in bf16 (torch._grouped_mm). At narrow experts (Ring-mini's 512) torch's grouped
    # FP8 GEMM is slower than the bf16 one (benchmarks/expert_mlp.py).
    fp8_routed_experts: bool = True
    # Triton fused kernels (QKV split + QK-norm + RoPE, grouped norm x gate, fused router,
    # SwiGLU) and megatron-core's fused cross-entropy on CUDA; the PyTorch reference path
    # elsewhere.
    fused_kernels: bool = False
    # Routed experts as one grouped GEMM per projection (torch._grouped_mm) instead of
    # megatron's loop over experts. Same parameters and checkpoint keys either way.
    grouped_experts: bool = False
    # Recompute the routed experts' fc1 + SwiGLU in backward instead of keeping their
    # activations; with FP8 the recompute emits only the quantised tensor backward needs.
    recompute_experts: bool = False

    def __post_init__(self) -> None:
        if self.fp8 not in FP8_RECIPES:
            raise ConfigError(f"compute.fp8={self.fp8!r}: must be one of {FP8_RECIPES}.")
        if self.recompute_experts and not self.grouped_experts:
            raise ConfigError(
                "compute.recompute_experts=true needs compute.grouped_experts=true: expert "
                "recomputation is part of the grouped expert MLP."
            )
