import pytest

from ring_train.parallel.distributed import destroy_distributed, init_distributed


@pytest.fixture
def single_process():
    """megatron-core parallel state for a job of one process (TP = PP = EP = 1)."""
    init_distributed(seed=1234)
    yield
    destroy_distributed()
