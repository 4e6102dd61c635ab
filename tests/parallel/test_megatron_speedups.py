"""The speed replacements of megatron_patches compute what the megatron-core code they replace
computes, without reading values back from the device."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import multi_token_prediction as mtp
from torch.utils._python_dispatch import TorchDispatchMode

from ring_train.parallel.megatron_patches import (apply_patches, remove_patches,
                                                  roll_left_within_documents)


class CountHostReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense: each read of a tensor value by the host (a device sync
    on GPUs)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.fixture
def megatron_roll():
    """megatron-core's own packed-sequence roll (patches removed while the test runs)."""
    remove_patches()
    yield mtp._roll_tensor_packed_seq
    remove_patches()


def packed(cu_seqlens):
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)


# Documents covering the row; empty and one-token documents; rows with positions outside any.
CASES = [[0, 7, 20, 32], [0, 0, 5, 5, 6, 32], [3, 10, 25], [0, 32], [0, 1, 2, 32]]


@pytest.mark.parametrize("cu_seqlens", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_packed_roll_equals_megatrons_without_host_reads(megatron_roll, cu_seqlens, dtype):
    g = torch.Generator().manual_seed(len(cu_seqlens))
    tensor = torch.randint(1, 1000, (1, 32), generator=g).to(dtype)
    params = packed(cu_seqlens)
    with CountHostReads() as theirs:
        want, want_sum = megatron_roll(tensor, -1, -1, params)
    with CountHostReads() as ours:
        got, got_sum = roll_left_within_documents(tensor, params.cu_seqlens_q)
    assert torch.equal(got, want) and torch.equal(got_sum, want_sum)
    assert theirs.reads > 0 and ours.reads == 0


def test_installed_by_apply_patches_for_rolls_without_context_parallelism(megatron_roll):
    tensor = torch.arange(1, 33).unsqueeze(0)
    params = packed([0, 7, 20, 32])
    apply_patches()
    assert mtp._roll_tensor_packed_seq is not megatron_roll
    got, _ = mtp.roll_tensor(tensor, shifts=-1, dims=-1, packed_seq_params=params)
    assert torch.equal(got, megatron_roll(tensor, -1, -1, params)[0])
    remove_patches()
    assert mtp._roll_tensor_packed_seq is megatron_roll
