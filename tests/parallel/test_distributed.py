"""init_distributed / destroy_distributed on CPU, and the layout checks' messages."""

import os

import pytest

from ring_train.parallel.distributed import validate_layout
from ring_train.testing.multiprocess import run_ranks


def _layout(world_size, tp=1, pp=1, vpp=None, ep=1, etp=1, cp=1):
    validate_layout(world_size, tp, pp, vpp, ep, etp, cp)


def test_valid_layouts_pass():
    _layout(8, tp=2, pp=2, ep=2, etp=2)
    _layout(4, pp=2, vpp=2)
    _layout(4, tp=2, ep=2, etp=1)


def test_world_size_not_divisible_by_dense_layout_names_sizes_and_fix():
    with pytest.raises(ValueError) as error:
        _layout(6, tp=4)
    message = str(error.value)
    assert "world size 6" in message and "tensor_parallel (4)" in message
    assert "launch a multiple of 4 processes" in message


def test_world_size_not_divisible_by_expert_layout_names_sizes_and_fix():
    with pytest.raises(ValueError) as error:
        _layout(4, tp=2, ep=4, etp=2)
    message = str(error.value)
    assert "expert_parallel (4)" in message and "expert_tensor_parallel (2)" in message
    assert "launch a multiple of 8 processes" in message


def test_virtual_pipeline_needs_a_pipeline():
    with pytest.raises(ValueError) as error:
        _layout(2, pp=1, vpp=2)
    assert "virtual_pipeline_parallel (2) needs pipeline_parallel > 1" in str(error.value)


def _init_switch_layouts_and_destroy(rank):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ring_train.parallel.megatron_patches import applied_patches, patch_names
    from ring_train.parallel.distributed import (
        destroy_distributed,
        device,
        init_distributed,
        pipeline_comm_kwargs,
    )

    init_distributed(tensor_parallel=2)
    seen = {
        "backend": dist.get_backend(),
        "device": device().type,
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "all_patches_applied": applied_patches() == patch_names(),
        "pipeline_comm_kwargs": pipeline_comm_kwargs(),
    }
    parallel_state.destroy_model_parallel()
    init_distributed(pipeline_parallel=2)
    seen["pp_rank"] = parallel_state.get_pipeline_model_parallel_rank()
    parallel_state.destroy_model_parallel()
    try:
        init_distributed(tensor_parallel=4)
    except ValueError as error:
        seen["bad_layout"] = str(error)
    destroy_distributed()
    seen["initialized_after_destroy"] = dist.is_initialized()
    # Without torchrun's WORLD_SIZE, each process is a job of its own.
    del os.environ["WORLD_SIZE"]
    init_distributed()
    seen["world_size_without_torchrun"] = dist.get_world_size()
    destroy_distributed()
    return seen


@pytest.mark.slow
def test_init_distributed_on_cpu_uses_gloo_and_patches_switches_layouts_and_runs_alone():
    for rank, seen in enumerate(run_ranks(_init_switch_layouts_and_destroy, 2)):
        assert seen["backend"] == "gloo"
        assert seen["device"] == "cpu"
        assert seen["tp_size"] == 2
        assert seen["all_patches_applied"]
        assert seen["pipeline_comm_kwargs"] == {"batch_p2p_comm": False}
        assert seen["pp_rank"] == rank
        assert "world size 2 is not divisible by tensor_parallel (4)" in seen["bad_layout"]
        assert seen["initialized_after_destroy"] is False
        assert seen["world_size_without_torchrun"] == 1
