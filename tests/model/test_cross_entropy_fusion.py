"""compute.fused_kernels turns on our vocab-parallel cross-entropy (kernels/cross_entropy) for the
main and MTP heads of the hybrid model (model/language_model.py); the model's per-token losses and
parameter gradients equal those of megatron-core's unfused cross-entropy."""

import pytest
import torch

from ring_train.config.compute import ComputeConfig
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.language_model import HybridGPTModel
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import device
from tests.kernels.kernel_testing import rel_err


GRAD_TOL = 3e-4 if torch.cuda.is_available() else 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_cross_entropy_fusion_goes_with_the_fused_kernels(fused):
    config = to_transformer_config(load_model_config("tiny"), ParallelConfig(),
                                   compute=ComputeConfig(fused_kernels=fused))
    assert config.cross_entropy_loss_fusion == fused


def test_model_losses_and_gradients_equal_megatrons_cross_entropy(single_process, monkeypatch):
    """The tiny model (with MTP) in fp32, the same weights and batch, with each cross-entropy:
    fp32 losses to summation order; each gradient to GRAD_TOL relative (Frobenius): 1e-5 on CPU,
    3e-4 on a GPU, whose kernels' rounding differences grow through the layers (embedding
    gradient 6e-5 on the H100)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU: the reference (interpreter tests: kernels/)
    cfg = load_model_config("tiny")
    config = to_transformer_config(cfg, ParallelConfig(), compute=ComputeConfig())
    torch.manual_seed(0)
    model = build_model(cfg, config).to(device())
    assert isinstance(model, HybridGPTModel) and model.config.mtp_num_layers
    g = torch.Generator().manual_seed(1)
    tokens, labels = (torch.randint(0, cfg.vocab_size, (2, 32), generator=g).to(device())
                      for _ in range(2))
    positions = torch.arange(32, device=device()).expand(2, -1)
    results = []
    for fused in (True, False):
        model.config.cross_entropy_loss_fusion = fused
        model.zero_grad()
        loss = model(tokens, positions, None, labels=labels, loss_mask=torch.ones(2, 32, device=device()))
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_f, grads_f), (loss_u, grads_u) = results
    assert loss_f.shape == (2, 32)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-5)
    assert grads_f.keys() == grads_u.keys() and any("mtp" in n for n in grads_f)
    for name in grads_f:
        assert rel_err(grads_f[name], grads_u[name]) < GRAD_TOL, name
