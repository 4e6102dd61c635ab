"""Training checkpoint (any layout, weights-only or training) -> HF directory: Ring-linear-2.0
(`BailingMoeLinearV2ForCausalLM`) for a hybrid model, Ling-2.0 for an all-softmax one.

Streams key by key: each global tensor is read once (a layer's stacked experts included),
turned into its HF tensors (`hf_layout`) and handed to the sharded writer, which holds at most
one shard's worth. The output appears complete or not at all.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional

import torch

from ring_train.checkpoint import collective
from ring_train.checkpoint.checkpoint_entries import checkpoint_entries, maps_by_key
from ring_train.checkpoint.compatibility import check_compatible
from ring_train.checkpoint.hf_config import model_config_to_hf
from ring_train.checkpoint.hf_io import TOKENIZER_FILES, HFCheckpointWriter, refuse_existing_output
from ring_train.checkpoint.integrity import verify_files
from ring_train.checkpoint.layout import resolve_checkpoint
from ring_train.checkpoint.marker import read_marker
from ring_train.checkpoint.model_record import HF_EXTRA, model_config_for
from ring_train.checkpoint.progress import Progress
from ring_train.checkpoint.streaming import CheckpointReader
from ring_train.config.model import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 2**30


def _tokenizer_source(given: Optional[Path], details: dict) -> Optional[Path]:
    """`given`, else the HF directory the checkpoint was imported from, if it is still there."""
    if given is not None:
        if not Path(given).is_dir():
            raise ValueError(f"tokenizer directory {given} does not exist.")
        return Path(given)
    recorded = details.get("imported_from")
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def export_hf_checkpoint(
    checkpoint: Path,
    output: Path,
    model_config: Optional[ModelConfig] = None,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_from: Optional[Path] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    checksums: bool = True,
    progress: bool = False,
) -> List[str]:
    """Write the model of `checkpoint` as an HF directory `output` in `dtype` (tensors the
    model keeps in fp32, the routers' expert bias, stay fp32), with tokenizer files copied
    from `tokenizer_from` (default: the HF directory it was imported from). `model_config`
    None: the one the import recorded. Returns the side files copied."""
    output = Path(output)
    refuse_existing_output(output, overwrite)
    # This process alone reads and checks the checkpoint (no rank shares the hashing).
    with collective.alone():
        checkpoint = resolve_checkpoint(Path(checkpoint))
        marker = read_marker(checkpoint)
        verify_files(checkpoint, marker.files, checksums)
        cfg = model_config or model_config_for(marker, checkpoint, None)
        entries = checkpoint_entries(cfg, dtype)
        check_compatible(checkpoint, entries.tensors, entries.tensors, marker.model_keys)
    tokenizer_dir = _tokenizer_source(tokenizer_from, marker.details)
    sources = maps_by_key(cfg, entries)
    reader = CheckpointReader(checkpoint)
    hf_config = {
        **model_config_to_hf(cfg, torch_dtype=str(dtype).removeprefix("torch.")),
        **marker.details.get(HF_EXTRA, {}),
    }
    writer = HFCheckpointWriter(output, hf_config, max_shard_bytes, overwrite)
    counter = Progress(f"export {checkpoint.name}", len(sources), enabled=progress)
    try:
        for key, parts in sources.items():
            shape, hf_dtype = entries.tensors[key]
            writer.reserve(math.prod(shape) * hf_dtype.itemsize)
            stored = reader.tensor(key)
            for expert, tensor_map in parts:
                part = stored if expert is None else stored[expert]
                for name, tensor in zip(tensor_map.hf, tensor_map.to_hf(part)):
                    writer.add(name, tensor.to(hf_dtype))
            counter.step(stored.numel() * stored.element_size())
            # Let go before the next read, which would otherwise overlap with this tensor.
            del stored, part, tensor
        copied = writer.copy_files(tokenizer_dir, TOKENIZER_FILES) if tokenizer_dir else []
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    counter.close()
    logger.info("exported %s to %s (%s), side files copied: %s", checkpoint, output,
                hf_config["architectures"][0], copied or "none")
    return copied
