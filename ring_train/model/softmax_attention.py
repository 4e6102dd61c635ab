"""Core attention of the softmax (GQA) layers on torch's scaled_dot_product_attention.

Replaces megatron-core's DotProductAttention in the SelfAttention spec: SDPA picks the flash or
memory-efficient kernel on GPU (no transformer-engine needed) and the math kernel on CPU, and
handles GQA without materialising repeated K/V. Packed documents (PackedSeqParams with
cu_seqlens, batch 1) attend causally within their own document only, the mask the lightning
layers' state reset matches.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class SDPAttention(MegatronModule):
    """Causal softmax attention. q: [s, b, h, d], k/v: [s, b, g, d] with h % g == 0."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal or attention_type != "self":
            raise ValueError(
                f"SDPAttention supports causal self-attention only, got {attn_mask_type} "
                f"{attention_type}."
            )
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Returns [s, b, h*d]."""
        if attention_mask is not None or attention_bias is not None:
            raise ValueError(
                "SDPAttention is causal and takes no attention mask or bias; pass "
                "PackedSeqParams (cu_seqlens) for document masking."
            )
        seq, batch, heads, dim = query.shape
        # SDPA wants [b, h, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if packed_seq_params is None:
            out = self._attend(q, k, v)
        else:
            if batch != 1:
                raise ValueError(f"packed sequences need micro batch size 1, got {batch}.")
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            out = torch.cat(
                [self._attend(*(t[:, :, a:b] for t in (q, k, v))) for a, b in zip(bounds, bounds[1:])],
                dim=2,
            )
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
