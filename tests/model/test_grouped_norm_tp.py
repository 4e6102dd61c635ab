"""The lightning output's grouped RMSNorm needs no collective under tensor parallelism, and each
rank's output is its slice of the whole-width norm."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import destroy_distributed, init_distributed
from ring_train.testing.multiprocess import run_ranks
from tests.reference.hf_models import group_rms_norm

class CollectiveCounter(TorchDispatchMode):
    """Records every c10d op (collective or point-to-point) dispatched while active: this sees
    calls however they were reached (megatron-core keeps references to some functions)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _run(rank):
    init_distributed(tensor_parallel=2)
    cfg = load_model_config("tiny")
    config = to_transformer_config(cfg, ParallelConfig(tensor_parallel=2))
    attention = build_model(cfg, config).decoder.layers[0].self_attention  # a lightning layer
    width = cfg.num_attention_heads * cfg.head_dim
    generator = torch.Generator().manual_seed(7)
    x_full = torch.randn(5, 3, width, generator=generator)
    weight_full = 1 + 0.1 * torch.randn(width, generator=generator)
    half = slice(rank * width // 2, (rank + 1) * width // 2)
    with torch.no_grad():
        attention.out_norm.weight.copy_(weight_full[half])
    x = x_full[..., half].clone().requires_grad_()

    with CollectiveCounter() as norm_calls:
        out = attention.out_norm(x)
        out.square().sum().backward()
    expected = group_rms_norm(x_full, weight_full, cfg.group_norm_size, cfg.rms_norm_eps)[..., half]
    error = ((out - expected).norm() / expected.norm()).item()

    # Control: the same counter sees the row-parallel projection's all-reduce.
    with CollectiveCounter() as proj_calls:
        attention.linear_proj(torch.randn(4, 3, width // 2))  # SP: rows split over TP
    destroy_distributed()
    return norm_calls.calls, proj_calls.calls, error


@pytest.mark.slow
def test_grouped_norm_issues_no_collective_under_tp2():
    for norm_calls, proj_calls, error in run_ranks(_run, 2, timeout=300):
        assert norm_calls == []
        assert proj_calls, "the counter must see megatron-core's collectives"
        assert error < 1e-6
