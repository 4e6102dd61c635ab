"""compute.fused_kernels turns on megatron-core's fused cross-entropy on CUDA, which equals its
unfused vocab-parallel cross-entropy (loss and logit gradient)."""

import pytest
import torch

from ring_train.config.compute import ComputeConfig
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.transformer_config import to_transformer_config


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_fused_cross_entropy_goes_with_the_fused_kernels_on_cuda(monkeypatch, cuda, fused):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = to_transformer_config(load_model_config("tiny"), ParallelConfig(),
                                   compute=ComputeConfig(fused_kernels=fused))
    assert config.cross_entropy_loss_fusion == (fused and cuda)
    assert config.cross_entropy_fusion_impl == "native"


def test_fused_cross_entropy_equals_the_unfused_one(single_process):
    """megatron's fused functions run eagerly here (tests/conftest.py turns dynamo off);
    training compiles them."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    vocab = 4096
    logits = (torch.randn(256, 1, vocab, generator=g) * 4).bfloat16().to(device)
    target = torch.randint(0, vocab, (256, 1), generator=g).to(device)
    d_loss = torch.rand(256, 1, generator=g).to(device)
    results = []
    for fused in (True, False):
        leaf = logits.clone().requires_grad_(True)
        loss = (fused_vocab_parallel_cross_entropy(
            leaf, target, parallel_state.get_tensor_model_parallel_group()) if fused
            else tensor_parallel.vocab_parallel_cross_entropy(leaf, target))
        loss.backward(d_loss)
        results.append((loss.detach().float(), leaf.grad.float()))
    (loss_f, grad_f), (loss_u, grad_u) = results
    # fp32 losses to reduction order; bf16 gradients to one rounding.
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_f, grad_u, rtol=1e-2, atol=1e-6)
