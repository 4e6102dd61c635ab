"""HF Ling-2.0 / Ring-linear-2.0 directory -> weights-only training checkpoint of the hybrid
model (or of the all-softmax model), streamed one tensor at a time.

Everything that can be checked is checked before anything is written: the architecture, the
conversion options, the target layout, every source tensor's name and shape against
config.json, and the output directory. Then each checkpoint key is produced when the writer
asks for it: its HF tensors are read from their shards (FP8 dequantised), converted to the
hybrid if asked (`ling_to_ring`), laid out for the framework (`hf_layout`) and cast; a layer's
experts are stacked into one key. The checkpoint holds layout-free global tensors, so
megatron-core loads it at any TP/PP/EP layout (e.g. as a recipe's `init_from`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ring_train.checkpoint.atomic_io import publish_dir
from ring_train.checkpoint.checkpoint_entries import CheckpointEntries, checkpoint_entries, maps_by_key
from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.hf_config import is_ring_linear, model_config_from_hf
from ring_train.checkpoint.hf_io import CheckpointFormatError, HFCheckpointReader, refuse_existing_output
from ring_train.checkpoint.hf_layout import megatron_to_hf
from ring_train.checkpoint.layout import IN_PROGRESS_SUFFIX
from ring_train.checkpoint.ling_to_ring import GateInit, ring_linear_tensors
from ring_train.checkpoint.model_record import model_details
from ring_train.checkpoint.progress import Progress
from ring_train.checkpoint.streaming import TensorInfo, write_weights_checkpoint
from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig
from ring_train.config.parallel import ParallelConfig, check_layout

logger = logging.getLogger(__name__)

HYBRID = "hybrid"
SOFTMAX = "softmax"
TARGETS = (HYBRID, SOFTMAX)


@dataclass(frozen=True)
class ImportOptions:
    # HYBRID: lightning layers per ARCH_SPEC §4.3; SOFTMAX: the Ling-2.0 model as it is.
    target: str = HYBRID
    # Required to convert a Ling-2.0 source to the hybrid; a Ring-linear source has its own.
    layer_group_size: Optional[int] = None
    group_norm_size: Optional[int] = None
    decay_variant: str = "A"
    gate: GateInit = GateInit()
    keep_mtp: bool = True
    # Parameter dtype of the checkpoint; None: fp32 for an fp32 source, bf16 otherwise.
    dtype: Optional[torch.dtype] = None


def target_model_config(source: ModelConfig, ring_source: bool, options: ImportOptions) -> ModelConfig:
    """The model the checkpoint will hold; ConfigError naming the option that cannot apply."""
    if options.target not in TARGETS:
        raise ConfigError(f"target={options.target!r}: must be one of {TARGETS}.")
    given = {"layer_group_size": options.layer_group_size, "group_norm_size": options.group_norm_size}
    given = {name: value for name, value in given.items() if value is not None}
    if ring_source:
        if options.target == SOFTMAX:
            raise ConfigError(
                "target=softmax needs a Ling-2.0 source; this checkpoint is already Ring-linear."
            )
        for name, value in given.items():
            if value != getattr(source, name):
                raise ConfigError(
                    f"{name}={value} differs from the Ring-linear source's {getattr(source, name)}; "
                    "a Ring-linear checkpoint is imported as it is."
                )
    elif options.target == SOFTMAX and given:
        raise ConfigError(f"{', '.join(given)} only apply to target=hybrid.")
    elif options.target == HYBRID:
        missing = [name for name in ("layer_group_size", "group_norm_size") if name not in given]
        if missing:
            raise ConfigError(
                f"converting Ling-2.0 to the hybrid needs {' and '.join(missing)} (Ring-mini: "
                "layer_group_size=5, group_norm_size=4; Ring-flash: layer_group_size=8)."
            )
        if given["layer_group_size"] < 2:
            raise ConfigError(
                f"layer_group_size={given['layer_group_size']} makes no lightning layer; use >= 2, "
                "or target=softmax for the all-softmax model."
            )
    mtp = source.num_nextn_predict_layers if options.keep_mtp else 0
    return dataclasses.replace(
        source, **given, decay_variant=options.decay_variant, num_nextn_predict_layers=mtp
    )


def source_dtype(hf_config: dict) -> torch.dtype:
    return torch.float32 if hf_config.get("torch_dtype") == "float32" else torch.bfloat16


def expected_hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """HF tensor name -> shape of every tensor an HF checkpoint of `cfg` holds."""
    framework = checkpoint_entries(cfg, torch.float32).framework
    meta = {name: torch.empty(shape, device="meta") for name, (shape, _) in framework.items()}
    return {name: tuple(t.shape) for name, t in megatron_to_hf(meta, cfg).items()}


def check_source_tensors(reader: HFCheckpointReader, cfg: ModelConfig) -> None:
    """Raise CheckpointFormatError on the first tensor that config.json does not explain:
    missing, of another shape, or not part of the model."""
    expected = expected_hf_shapes(cfg)
    found = reader.shapes()
    where = f"{reader.directory} (config.json)"
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointFormatError(
            f"{where}: tensor {missing[0]} (shape {expected[missing[0]]}) is missing; "
            f"{len(missing)} tensors of the model are missing in all."
        )
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointFormatError(
                f"{where}: tensor {name} in {reader.shard_of(name)} has shape {found[name]}, "
                f"config.json implies {shape}."
            )
    unexpected = [name for name in reader.names() if name not in expected]
    if unexpected:
        raise CheckpointFormatError(
            f"{where}: tensor {unexpected[0]} (shape {found[unexpected[0]]}) is not part "
            f"of the model config.json describes; {len(unexpected)} such tensors."
        )


def _producer(
    cfg: ModelConfig, entries: CheckpointEntries, get: Callable[[str], Tensor], progress: Progress
) -> Callable[[str], object]:
    """`produce(key)` for the checkpoint writer: the global tensor of `key` from HF tensors."""
    sources = maps_by_key(cfg, entries)

    def produce(key: str):
        if key in entries.objects:
            return entries.objects[key]
        shape, dtype = entries.tensors[key]
        parts = sources[key]
        build = lambda m: m.to_megatron(*(get(name) for name in m.hf)).to(dtype)
        if parts[0][0] is None:
            tensor = build(parts[0][1])
        else:  # a layer's experts, stacked on the leading axis
            tensor = torch.empty(shape, dtype=dtype)
            for expert, tensor_map in parts:
                tensor[expert] = build(tensor_map)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{key}: made a tensor of shape {tuple(tensor.shape)}, expected {shape}.")
        progress.step(tensor.numel() * tensor.element_size())
        return tensor

    return produce


def _write_order(tensors: Dict[str, TensorInfo]) -> Dict[str, TensorInfo]:
    """`tensors` with large and small entries alternating. The checkpoint writer still holds
    the entry it wrote last while the next one is produced; in this order the largest ones (a
    layer's stacked experts) are never in memory together."""
    nbytes = lambda key: math.prod(tensors[key][0]) * tensors[key][1].itemsize
    by_size = sorted(tensors, key=nbytes, reverse=True)
    half = (len(by_size) + 1) // 2
    pairs = itertools.zip_longest(by_size[:half], reversed(by_size[half:]))
    return {key: tensors[key] for pair in pairs for key in pair if key is not None}


def _remove(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def import_hf_checkpoint(
    source: Path,
    output: Path,
    options: ImportOptions = ImportOptions(),
    parallel: Optional[ParallelConfig] = None,
    overwrite: bool = False,
    checksums: bool = True,
    progress: bool = False,
) -> Path:
    """Write the weights-only checkpoint `output` from the HF directory `source`; returns
    `output`. `parallel` (default: one process) is the layout the checkpoint is meant for,
    checked against the model; the checkpoint itself loads at any layout. Raises ConfigError,
    CheckpointFormatError or FileExistsError before anything is written; `output` appears
    complete or not at all."""
    source, output = Path(source), Path(output)
    reader = HFCheckpointReader(source)
    source_cfg = model_config_from_hf(reader.config)
    cfg = target_model_config(source_cfg, is_ring_linear(reader.config), options)
    check_layout(cfg, parallel or ParallelConfig())
    refuse_existing_output(output, overwrite)
    check_source_tensors(reader, source_cfg)
    dtype = options.dtype or source_dtype(reader.config)
    entries = checkpoint_entries(cfg, dtype)
    converts = not is_ring_linear(reader.config) and options.target == HYBRID
    get = ring_linear_tensors(reader.get, cfg, options.gate) if converts else reader.get
    counter = Progress(f"import {source.name}", len(entries.tensors), enabled=progress)
    details = model_details(
        cfg, reader.config, imported_from=str(source.resolve()),
        conversion=dataclasses.asdict(options.gate) if converts else None,
    )
    # Written beside the output and renamed over it at the end: an existing checkpoint stays
    # whole until the new one is complete.
    staging = output.with_name(output.name + ".importing")
    staging_tmp = staging.with_name(staging.name + IN_PROGRESS_SUFFIX)
    _remove(staging, staging_tmp)
    try:
        write_weights_checkpoint(
            staging, 0, _write_order(entries.tensors), list(entries.objects),
            _producer(cfg, entries, get, counter), details, checksums,
        )
        counter.close()
        refuse_existing_output(output, overwrite)
        publish_dir(staging, output)
    except BaseException:
        _remove(staging, staging_tmp)
        raise
    logger.info("imported %s into %s (%d tensors, %.2f GiB)", source, output, counter.done,
                counter.bytes / 2**30)
    return output
