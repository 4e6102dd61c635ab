"""Lightning attention: the linear-attention layer of Ring-linear-2.0 (ARCH_SPEC §2).

    qkvg = x W                                one column-parallel GEMM, heads split over TP
    q, k = RMSNorm(q), RMSNorm(k)             per head, weights [D]
    q, k = RoPE(q), RoPE(k)                   NeoX style on the first rotary_dim dims
    o    = LinearAttention(q, k, v; slope)    causal, per-head decay exp(-slope), fp32 state
    o    = GroupedRMSNorm(o) * sigmoid(g)     groups inside a TP rank: no collective
    out  = o W_out                            row-parallel

The gate projection `g_proj` of the HF model is fused into the QKV projection: one GEMM and,
under sequence parallelism, one all-gather of x instead of two. Each head's rows are stored
together as [q_h; k_h; v_h; g_h] so a contiguous TP shard holds whole heads and checkpoints
reshard without conversion code.

With `compute.fused_kernels` the split + QK-norm + RoPE before the attention and the grouped
norm x gate after it run as one Triton kernel each (kernels/qk_norm_rope, kernels/gated_norm),
forward and backward; the PyTorch path below is their reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import Tensor

from kernels.gated_norm import gated_group_rms_norm
from kernels.lightning_attention import lightning_attention
from kernels.qk_norm_rope import qkvg_split_norm_rope
from ring_train.model.transformer_config import HybridTransformerConfig

QKVG = 4  # rows per head in the fused projection: q, k, v, gate


def alibi_slopes(num_heads: int) -> Tensor:
    """The per-head base slopes of ALiBi / MiniMax (`_build_slope_tensor`), fp64 [H]."""

    def power_of_two(n: int) -> list:
        ratio = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [ratio ** (h + 1) for h in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def layer_decay_factor(layer: int, num_layers: int, variant: str) -> float:
    """f(l) of ARCH_SPEC §2.4 for 0-based global layer index `layer`.

    Variant "A" (training and serving stacks): 1 - l/(L-1) + 1e-5.
    Variant "B" (HF remote code as quoted): 1 - (l-1)/(L-1) + 1e-5.
    """
    if num_layers <= 1:
        return 1.0 + 1e-5
    shift = {"A": 0, "B": 1}[variant]
    return 1.0 - (layer - shift) / (num_layers - 1) + 1e-5


def lightning_slopes(num_heads: int, layer: int, num_layers: int, variant: str) -> Tensor:
    """Positive fp32 decay rates [H]: head h of layer l decays by exp(-slope[h]) per token."""
    return (alibi_slopes(num_heads) * layer_decay_factor(layer, num_layers, variant)).float()


@dataclass
class LightningAttentionSubmodules:
    linear_qkvg: Union[ModuleSpec, type]
    q_layernorm: Union[ModuleSpec, type]
    k_layernorm: Union[ModuleSpec, type]
    out_norm: Union[ModuleSpec, type]
    linear_proj: Union[ModuleSpec, type]


class LightningAttention(MegatronModule):
    """Drop-in for megatron-core's SelfAttention in a TransformerLayer.

    Args:
        layer_number: 1-based global layer number (megatron-core convention).
    """

    def __init__(
        self,
        config: HybridTransformerConfig,
        submodules: LightningAttentionSubmodules,
        layer_number: int,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        tp_rank = pg_collection.tp.rank()
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp_size
        width_per_rank = self.heads_per_rank * self.head_dim

        self.linear_qkvg = build_module(
            submodules.linear_qkvg,
            config.hidden_size,
            QKVG * config.num_attention_heads * self.head_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=pg_collection.tp,
        )
        self.q_layernorm = build_module(
            submodules.q_layernorm, config=config, hidden_size=self.head_dim,
            eps=config.layernorm_epsilon,
        )
        self.k_layernorm = build_module(
            submodules.k_layernorm, config=config, hidden_size=self.head_dim,
            eps=config.layernorm_epsilon,
        )
        self.out_norm = build_module(
            submodules.out_norm,
            config=config,
            hidden_size_per_partition=width_per_rank,
            groups_per_partition=config.group_norm_size // tp_size,
            eps=config.layernorm_epsilon,
        )
        self.linear_proj = build_module(
            submodules.linear_proj,
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=pg_collection.tp,
        )
        all_slopes = lightning_slopes(
            config.num_attention_heads, layer_number - 1, config.num_layers, config.decay_variant
        )
        heads = slice(tp_rank * self.heads_per_rank, (tp_rank + 1) * self.heads_per_rank)
        # A plain attribute, not a buffer: Float16Module would cast a buffer to bf16.
        self._slope_cpu = all_slopes[heads].contiguous()
        self._slope_on_device: Optional[Tensor] = None

    def slope(self, device: torch.device) -> Tensor:
        """This rank's fp32 decay rates [H/tp]."""
        if self._slope_on_device is None or self._slope_on_device.device != device:
            self._slope_on_device = self._slope_cpu.to(device)
        return self._slope_on_device

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        rotary_pos_emb: Optional[Union[Tensor, tuple]] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        inference_context=None,
        **unused_rope_and_bias_kwargs,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """hidden_states: [s(/tp under SP), b, hidden] -> ([s(/tp), b, hidden], bias)."""
        if inference_context is not None:
            raise NotImplementedError(
                "LightningAttention has no megatron-core inference path; export the model to "
                "HF format (tools/convert_ling_ckpt.py export) and serve it with SGLang or vLLM."
            )
        qkvg, _ = self.linear_qkvg(hidden_states)  # [s, b, H/tp * 4 * D]
        if self.config.fused_kernels:
            # The same math in one kernel each side of the attention; q, k, v come out
            # contiguous, so the attention reads unit-stride rows.
            if self.config.rotary_interleaved:
                raise NotImplementedError("fused_kernels: the fused RoPE is NeoX rotate-half; "
                                          "set rotary_interleaved False or fused_kernels off")
            q, k, v, gate = qkvg_split_norm_rope(
                qkvg, self.q_layernorm.weight, self.k_layernorm.weight, rotary_pos_emb,
                eps=self.q_layernorm.eps, silu=self.config.linear_silu,
            )
            cu_seqlens = self._document_boundaries(packed_seq_params)
            out, _ = lightning_attention(q, k, v, self.slope(q.device), cu_seqlens=cu_seqlens)
            out = gated_group_rms_norm(
                out, gate, self.out_norm.weight, self.out_norm.groups, self.out_norm.eps
            )
            return self.linear_proj(out)
        seq, batch = qkvg.shape[:2]
        qkvg = qkvg.view(seq, batch, self.heads_per_rank, QKVG, self.head_dim)
        q, k, v, gate = qkvg.unbind(dim=3)
        if self.config.linear_silu:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary_pos_emb is not None:
            q_pos, k_pos = (
                rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            )
            q = apply_rotary_pos_emb(q, q_pos, config=self.config)
            k = apply_rotary_pos_emb(k, k_pos, config=self.config)

        out, _ = lightning_attention(
            q, k, v, self.slope(q.device), cu_seqlens=self._document_boundaries(packed_seq_params)
        )
        out = out.reshape(seq, batch, self.heads_per_rank * self.head_dim)
        out = self.out_norm(out) * torch.sigmoid(gate.reshape_as(out))
        return self.linear_proj(out)

    def _document_boundaries(self, packed_seq_params: Optional[PackedSeqParams]) -> Optional[Tensor]:
        if packed_seq_params is None or not self.config.reset_state_at_eod:
            return None
        return packed_seq_params.cu_seqlens_q
