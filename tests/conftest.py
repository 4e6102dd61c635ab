import os

# Dynamo compiles a few megatron-core MoE helpers on first use; on 2 CPU cores that costs
# seconds per process and buys nothing for tests.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
