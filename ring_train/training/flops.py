"""Model FLOPs per token and MFU, from activated parameters plus attention.

Per trained token (forward + backward = 3x forward):
  * every activated weight matrix: 6 FLOPs per parameter (input embeddings are lookups: 0);
  * a causal softmax layer: QK^T and AV over s/2 keys on average: 3 * 2 * 2 * H*D * s/2;
  * a lightning layer: k^T v state update and q S readout, 2 * H*D*D each: 3 * 4 * H*D*D.
"""

from __future__ import annotations

from typing import Optional

import torch

from ring_train.config.model import ModelConfig
from ring_train.model.params import count_parameters

# Dense bf16 tensor-core peaks (TFLOP/s) of one device.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    count = count_parameters(model, include_mtp=True)
    input_embedding = model.vocab_size * model.hidden_size
    matmul_params = count.active - input_embedding
    width = model.num_attention_heads * model.head_dim
    softmax = len(model.softmax_layers) + model.num_nextn_predict_layers
    lightning = model.num_hidden_layers - len(model.softmax_layers)
    attention = softmax * 6 * width * seq_length + lightning * 12 * width * model.head_dim
    return 6.0 * matmul_params + attention


def device_peak_tflops(override: Optional[float]) -> Optional[float]:
    """Peak bf16 TFLOP/s of this process's device: the override, a known GPU, else None."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
