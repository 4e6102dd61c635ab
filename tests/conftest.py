import os

# Dynamo compiles a few megatron-core MoE helpers on first use; on 2 CPU cores that costs
# seconds per process and buys nothing for tests.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads the
# variable when a kernel is decorated, so it must be set before anything imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def single_process():
    """megatron-core parallel state for a job of one process (TP = PP = EP = 1)."""
    from ring_train.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(seed=1234)
    yield
    destroy_distributed()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
