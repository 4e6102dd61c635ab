"""The vocab-parallel cross-entropy (kernels/cross_entropy): the Triton kernels against their
reference, the loss and logit gradient against torch's and megatron-core's cross-entropies, the
tensor-parallel combination on 2 gloo ranks, and (gpu) a Ring-mini-sized vocabulary.

Tolerances: losses are fp32 sums in another order (1e-5 relative); bf16 logit gradients within
one bf16 rounding (2^-8 relative, plus 1e-6 absolute for entries near zero).
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import triton_kernels as TK
from kernels.cross_entropy import vocab_parallel_cross_entropy
from kernels.cross_entropy.reference import logits_grad_reference, row_statistics_reference
from ring_train.testing.multiprocess import run_ranks
from tests.kernels.kernel_testing import DEVICE

LOSS_RTOL = 1e-5


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(TK, "BLOCK_V", 64)  # several chunks per row, a partial last one


def make(N, V, dtype=torch.bfloat16, device=DEVICE, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * scale).to(device, dtype)
    target = torch.randint(0, V, (N,), generator=g).to(device)
    d_loss = torch.rand(N, generator=g).to(device)
    return logits, target, d_loss


def torch_ce(logits, target, d_loss):
    """fp32 loss and the logits' fp32 gradient from torch.nn.functional.cross_entropy."""
    leaf = logits.detach().float().requires_grad_(True)
    loss = F.cross_entropy(leaf.view(-1, leaf.shape[-1]), target.reshape(-1), reduction="none")
    loss.backward(d_loss.reshape(-1).float())
    return loss.detach().view(target.shape), leaf.grad


def assert_grad_close(grad, want):
    assert grad.dtype == torch.bfloat16
    assert ((grad.float() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()


@pytest.mark.parametrize("vocab_start", [0, 150, -1000])  # target in, partly in, never in shard
def test_kernels_match_the_reference(vocab_start, small_blocks):
    logits, target, d_loss = make(24, 200)
    target = target + max(vocab_start, 0)
    got = TK.row_statistics_triton(logits, target, vocab_start)
    want = row_statistics_reference(logits, target, vocab_start)
    for name, a, b in zip(("max", "sum", "target logit"), got, want):
        torch.testing.assert_close(a, b, rtol=LOSS_RTOL, atol=0, msg=name)
    lse = want[0] + torch.log(want[1])
    grad = TK.logits_grad_triton(logits, lse, target, vocab_start, d_loss)
    assert_grad_close(grad, logits_grad_reference(logits.float(), lse, target, vocab_start,
                                                  d_loss))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_and_gradient_equal_torchs_cross_entropy(dtype, small_blocks):
    logits, target, d_loss = make(6 * 4, 333, dtype)
    logits, target, d_loss = logits.view(6, 4, 333), target.view(6, 4), d_loss.view(6, 4)
    leaf = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(leaf, target)
    loss.backward(d_loss)
    want_loss, want_grad = torch_ce(logits, target, d_loss)
    assert loss.dtype == torch.float32 and loss.shape == (6, 4)
    torch.testing.assert_close(loss, want_loss, rtol=LOSS_RTOL, atol=1e-6)
    assert leaf.grad.dtype == dtype
    if dtype == torch.bfloat16:
        assert_grad_close(leaf.grad, want_grad.view(6, 4, 333))
    else:
        torch.testing.assert_close(leaf.grad, want_grad.view(6, 4, 333), rtol=1e-5, atol=1e-7)


def test_equals_megatrons_cross_entropy(single_process):
    from megatron.core import tensor_parallel

    logits, target, d_loss = make(64, 1000, seed=3)
    results = []
    for ours in (True, False):
        leaf = logits.view(64, 1, 1000).clone().requires_grad_(True)
        loss = (vocab_parallel_cross_entropy(leaf, target.view(64, 1)) if ours
                else tensor_parallel.vocab_parallel_cross_entropy(leaf, target.view(64, 1)))
        loss.backward(d_loss.view(64, 1))
        results.append((loss.detach(), leaf.grad.float()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=LOSS_RTOL, atol=1e-6)
    assert_grad_close(results[0][1].bfloat16(), results[1][1])


def test_cpu_without_the_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, target, d_loss = make(8, 100, device="cpu")
    leaf = logits.clone().requires_grad_(True)
    vocab_parallel_cross_entropy(leaf, target).backward(d_loss)
    want_loss, want_grad = torch_ce(logits, target, d_loss)
    torch.testing.assert_close(vocab_parallel_cross_entropy(logits, target), want_loss,
                               rtol=LOSS_RTOL, atol=1e-6)
    assert_grad_close(leaf.grad, want_grad)


def test_rejects_mismatched_shapes():
    logits, target, _ = make(8, 100)
    with pytest.raises(ValueError, match="same leading shape"):
        vocab_parallel_cross_entropy(logits, target[:4])


def _two_shards(rank):
    """Rank r's loss and gradient for the vocabulary shard r of 2 (tensor-parallel group)."""
    from megatron.core import parallel_state

    from ring_train.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(tensor_parallel=2)
    TK.BLOCK_V = 64
    logits, target, d_loss = make(32, 2 * 150, device="cpu", seed=5)
    shard = logits[:, rank * 150:(rank + 1) * 150].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, target,
                                        parallel_state.get_tensor_model_parallel_group())
    loss.backward(d_loss)
    destroy_distributed()
    return loss.detach(), shard.grad


@pytest.mark.slow
def test_two_tensor_parallel_shards_give_the_full_vocabularys_loss():
    logits, target, d_loss = make(32, 300, device="cpu", seed=5)
    want_loss, want_grad = torch_ce(logits, target, d_loss)
    for rank, (loss, grad) in enumerate(run_ranks(_two_shards, 2)):
        torch.testing.assert_close(loss, want_loss, rtol=LOSS_RTOL, atol=1e-6)
        assert_grad_close(grad, want_grad[:, rank * 150:(rank + 1) * 150])


@pytest.mark.gpu
def test_gpu_ring_mini_vocabulary():
    """4096 tokens x Ring's 157184-token vocabulary in bf16, default blocks."""
    logits, target, d_loss = make(4096, 157184, device="cuda", seed=11)
    leaf = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(leaf, target)
    loss.backward(d_loss)
    want_loss, want_grad = torch_ce(logits, target, d_loss)
    torch.testing.assert_close(loss, want_loss, rtol=LOSS_RTOL, atol=1e-5)
    assert_grad_close(leaf.grad, want_grad)
