"""The tiny hybrid model (lightning + softmax layers, dense + MoE FFN, MTP) built under a
parallel layout from layout-independent global weights, with an optimizer, and trained on
either of two kinds of batches:

* `seeded_batch(step)`: drawn from a generator seeded by the step, the same under every layout
  (for runs compared across layouts);
* `rng_batch(step)`: picked by the global torch generator and megatron-core's model-parallel
  RNG tracker, so a resumed run reproduces the data only if every RNG state was restored (for
  runs compared at one layout with TP = 1, where all ranks' trackers agree).
"""

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from ring_train.config.model import load_model_config
from ring_train.config.optim import OptimConfig
from ring_train.config.parallel import ParallelConfig
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import init_distributed, pipeline_comm_kwargs
from ring_train.testing.global_weights import fill_global_weights
from ring_train.training.setup import build_model_chunks, build_optimizer, wrap_ddp
from ring_train.data.microbatch import Microbatch
from ring_train.training.step import train_step
from tests.model.hybrid_layouts import global_batch as seeded_batch

# SGD with momentum: its state (the momentum buffer) must survive a checkpoint, and the update
# is linear in the gradient, so layouts that differ by fp32 reduction order stay within 1e-6.
SGD = OptimConfig(optimizer="sgd", lr=0.1, sgd_momentum=0.9, weight_decay=0.0, clip_grad=0.0)
# Adam on the distributed optimizer, for resumes at one layout (compared bit for bit).
ADAM_DISTRIBUTED = OptimConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, distributed_optimizer=True)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None


@dataclass
class Run:
    model: list  # DDP-wrapped chunks
    optimizer: object


def build(
    layout: Layout, optim: OptimConfig = SGD, model_overrides: Optional[Dict] = None, seed: int = 1234
) -> Run:
    """Parallel groups, model with the global weights, DDP and optimizer (destroys any groups of
    a previous layout in this process first)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    init_distributed(
        tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp,
        virtual_pipeline_parallel=layout.vpp,
        seed=seed,
    )
    model_cfg = dataclasses.replace(load_model_config("tiny"), **(model_overrides or {}))
    parallel = ParallelConfig(
        tensor_parallel=layout.tp,
        pipeline_parallel=layout.pp,
        virtual_pipeline_parallel=layout.vpp,
    )
    config = to_transformer_config(model_cfg, parallel, **pipeline_comm_kwargs())
    chunks = build_model_chunks(model_cfg, config)
    fill_global_weights(chunks)
    distributed = bool(optim.distributed_optimizer)
    model = wrap_ddp(chunks, config, distributed_optimizer=distributed)
    return Run(model, build_optimizer(model, optim, config, distributed_optimizer=distributed))


def rng_batch(step: int) -> List[Microbatch]:
    """A batch picked by the global torch generator and the model-parallel tracker together."""
    choice = int(torch.randint(0, 1 << 20, ()))
    with get_cuda_rng_tracker().fork():
        choice += int(torch.randint(0, 1 << 20, ()))
    return seeded_batch(choice)


def train(run: Run, steps: range, batch=seeded_batch) -> List[float]:
    """The global loss of each step in `steps`."""
    return [train_step(run.model, run.optimizer, batch(step)).loss for step in steps]


def parameters(run: Run) -> Dict[str, torch.Tensor]:
    """This rank's parameter shards by name (copies)."""
    return {
        f"{index}.{name}": param.detach().clone()
        for index, chunk in enumerate(run.model)
        for name, param in chunk.module.named_parameters()
    }


def optimizer_tensors(run: Run) -> List[torch.Tensor]:
    """Every tensor of this rank's optimizer state (moments, step counts, main params), in a
    fixed order."""
    tensors = []
    for inner in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
        torch_optimizer = inner.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                tensors.append(param.detach().clone())
                for key in sorted(torch_optimizer.state[param]):
                    value = torch_optimizer.state[param][key]
                    tensors.append(torch.as_tensor(value).detach().clone())
    return tensors
