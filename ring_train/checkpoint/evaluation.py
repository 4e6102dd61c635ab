"""A checkpoint's model measured: loaded at a parallel layout, its loss on the validation
samples of a dataset blend, and its logits for given token ids, so conversions and merges can
be compared numerically.

Collective: every rank of the job calls each function, with parallel state initialised
(`ring_train.parallel.distributed.init_distributed`) for `parallel`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from torch import Tensor

from ring_train.checkpoint.sharded_state import unwrap
from ring_train.checkpoint.training_checkpoint import load_weights
from ring_train.config.data import DataConfig
from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig
from ring_train.config.parallel import ParallelConfig
from ring_train.data.stream import BatchLayout, build_streams
from ring_train.data.tokenizers import check_vocab, load_tokenizer
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import device, pipeline_comm_kwargs
from ring_train.training.setup import build_model_chunks
from ring_train.training.step import evaluate

Model = List[torch.nn.Module]


def load_for_evaluation(
    checkpoint: Path, cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
    checksums: bool = True,
) -> Model:
    """This rank's model chunks of `cfg` in `dtype`, holding the weights of `checkpoint`."""
    config = to_transformer_config(cfg, parallel, params_dtype=dtype, **pipeline_comm_kwargs())
    chunks = build_model_chunks(cfg, config)
    load_weights(checkpoint, chunks, checksums)
    return chunks


def validation_loss(
    model: Model, data: DataConfig, seq_length: int, samples: int, micro_batch_size: int = 1
) -> tuple[float, int]:
    """(mean loss per token, tokens) over the first `samples` validation samples of `data`:
    the samples a training run with the same data settings and seq length evaluates."""
    tokenizer = load_tokenizer(data.tokenizer, data.eod_token)
    check_vocab(tokenizer, unwrap(model[0]).vocab_size)
    layout = BatchLayout(
        seq_length, micro_batch_size * parallel_state.get_data_parallel_world_size(),
        micro_batch_size, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
    )
    streams = build_streams(data, tokenizer, layout, train_steps=1, eval_samples=samples, stage="eval")
    microbatches = [m.to(device()) for m in streams.validation.microbatches()]
    return evaluate(model, microbatches)


@torch.no_grad()
def logits(model: Model, token_ids: Tensor) -> Tensor:
    """Full-vocabulary logits [b, T, V] (fp32) of the main head for `token_ids` [b, T]; on
    every rank. Needs pipeline_parallel = 1 (the head and the embedding on one stage)."""
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ConfigError("logits need parallel.pipeline_parallel=1; evaluate the loss instead.")
    chunk = model[0]
    gpt = unwrap(chunk)
    outputs = []
    # GPTModel returns losses, not logits, once it has MTP; the head's last call is the main one.
    hook = gpt.output_layer.register_forward_hook(lambda m, i, out: outputs.append(out[0].clone()))
    length = token_ids.shape[1]
    # Sequence parallelism splits the tokens over the TP ranks. The model is causal, so
    # tokens appended at the end change nothing before them.
    padded = -(-length // parallel_state.get_tensor_model_parallel_world_size())
    padded *= parallel_state.get_tensor_model_parallel_world_size()
    ids = torch.nn.functional.pad(token_ids, (0, padded - length)).to(device())
    positions = torch.arange(padded, device=ids.device).expand_as(ids)
    chunk.eval()
    try:
        chunk(ids, positions, None, labels=ids if gpt.mtp_process else None)
    finally:
        hook.remove()
    local = outputs[-1]  # [T, b, V / TP]
    full = gather_from_tensor_model_parallel_region(local).transpose(0, 1)
    return full[:, :length].float().cpu()
