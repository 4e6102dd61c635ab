"""Process groups: join the job torchrun started and build megatron-core's parallel groups.

On a GPU machine the backend is NCCL and each process uses the GPU named by LOCAL_RANK. Without
CUDA the backend is gloo on CPU. `megatron_patches` makes megatron-core run there, and fixes
its bugs on paths without Transformer Engine on every device.
"""

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from ring_train.parallel.megatron_patches import apply_patches

logger = logging.getLogger(__name__)


def device() -> torch.device:
    """The device this process computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def validate_layout(
    world_size: int,
    tensor_parallel: int,
    pipeline_parallel: int,
    virtual_pipeline_parallel: Optional[int],
    expert_parallel: int,
    expert_tensor_parallel: int,
    context_parallel: int,
) -> None:
    """Raise ValueError, naming the sizes and the fix, if they do not tile `world_size`."""
    dense = tensor_parallel * pipeline_parallel * context_parallel
    if world_size % dense:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel ({tensor_parallel}) x "
            f"pipeline_parallel ({pipeline_parallel}) x context_parallel ({context_parallel}) "
            f"= {dense}; launch a multiple of {dense} processes or choose smaller sizes"
        )
    expert = expert_tensor_parallel * expert_parallel * pipeline_parallel
    if world_size % expert:
        raise ValueError(
            f"world size {world_size} is not divisible by expert_tensor_parallel "
            f"({expert_tensor_parallel}) x expert_parallel ({expert_parallel}) x "
            f"pipeline_parallel ({pipeline_parallel}) = {expert}; launch a multiple of {expert} "
            "processes or choose smaller expert sizes"
        )
    if virtual_pipeline_parallel is not None and pipeline_parallel < 2:
        raise ValueError(
            f"virtual_pipeline_parallel ({virtual_pipeline_parallel}) needs pipeline_parallel > 1 "
            f"(got {pipeline_parallel}); set pipeline_parallel >= 2 or virtual_pipeline_parallel "
            "to None"
        )


def join_process_group() -> None:
    """Join the job torchrun started (or a job of one process); idempotent."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:  # started by torchrun: env:// rendezvous
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    else:  # a plain `python` process (or a test) is a job of one
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    logger.info(
        "rank %d of %d joined the process group (%s on %s)",
        dist.get_rank(),
        dist.get_world_size(),
        backend,
        device().type,
    )


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    expert_parallel: int = 1,
    expert_tensor_parallel: Optional[int] = None,
    context_parallel: int = 1,
    seed: int = 1234,
) -> None:
    """Join the process group (once per process) and build megatron-core's parallel groups.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as set by torchrun; without
    WORLD_SIZE the process is a job of one. `expert_tensor_parallel` defaults to
    `tensor_parallel`, as in megatron-core. Seeds torch and megatron-core's model-parallel RNG
    tracker with `seed`. Call again after `parallel_state.destroy_model_parallel()` to switch
    layouts within one process group.
    """
    apply_patches()  # CPU patches on CPU; no-TE fixes wherever Transformer Engine is absent
    expert_tensor_parallel = expert_tensor_parallel or tensor_parallel
    join_process_group()
    validate_layout(
        dist.get_world_size(),
        tensor_parallel,
        pipeline_parallel,
        virtual_pipeline_parallel,
        expert_parallel,
        expert_tensor_parallel,
        context_parallel,
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron-core's parallel groups and leave the process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def pipeline_comm_kwargs() -> dict:
    """ModelParallelConfig fields the pipeline schedules need on the current backend.

    On gloo, with interleaved pipelining on two stages (the previous and the next stage are the
    same rank), batch_isend_irecv pairs the messages to that rank in the wrong order: losses and
    grads come out silently wrong, with no error. The unbatched path orders sends and receives
    so that they pair up, and is right in every layout, so gloo always uses it.
    """
    if dist.get_backend() == "gloo":
        return {"batch_p2p_comm": False}
    return {}
