"""The hybrid language model: megatron-core's GPTModel with our cross-entropy.

With `config.cross_entropy_loss_fusion` (on with compute.fused_kernels), the language-model loss
of the main head and of the MTP heads is kernels.cross_entropy's vocab-parallel cross-entropy: two
passes over the bf16 logits, where megatron-core's own (fused or not) works on an fp32 copy and
keeps an fp32 softmax of the whole vocabulary shard for backward. Without it, megatron-core's
unfused vocab-parallel cross-entropy runs.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from torch import Tensor

from kernels.cross_entropy import vocab_parallel_cross_entropy


class HybridGPTModel(GPTModel):
    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """Per-token loss [b, s] of logits [s, b, V_shard] against labels [b, s]."""
        if not self.config.cross_entropy_loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()
