"""Streaming access to HF checkpoint directories (config.json + safetensors shards).

The reader opens shards lazily and returns one tensor at a time (FP8 block-quantised weights
dequantised on the fly); the writer buffers tensors up to a shard size and writes the shards
and `model.safetensors.index.json` into a temporary directory renamed into place at the end,
so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ring_train.checkpoint.atomic_io import publish_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128
T = TypeVar("T")
# Side files of an HF model directory that carry over unchanged through a conversion.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
)


class CheckpointFormatError(ValueError):
    """An HF checkpoint directory that cannot be read as what it claims to be."""


def dequantize_fp8_blocks(weight: Tensor, scale_inv: Tensor, block: int = FP8_BLOCK) -> Tensor:
    """fp8 [M, N] with per-[block x block] scales [ceil(M/block), ceil(N/block)] -> fp32 [M, N].

    Scales one row of blocks at a time, so memory beyond the fp32 result is one [block, N]
    strip rather than a full-size scale matrix."""
    rows, cols = weight.shape
    expected = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointFormatError(
            f"FP8 scales of shape {tuple(scale_inv.shape)} for a weight of shape {(rows, cols)}; "
            f"blocks of {block}x{block} need {expected}."
        )
    out = weight.to(torch.float32)
    column_scales = scale_inv.float().repeat_interleave(block, dim=1)[:, :cols]
    for index, scale in enumerate(column_scales):
        out[index * block : (index + 1) * block] *= scale
    return out


class HFCheckpointReader:
    """Tensors of an HF directory by name, read on demand from their shard."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise CheckpointFormatError(f"{config_path} not found: not an HF checkpoint directory.")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except ValueError as exc:
            raise CheckpointFormatError(f"{config_path} is not valid JSON: {exc}") from exc
        self._shard_of = self._weight_map()
        missing = sorted({s for s in self._shard_of.values() if not (self.directory / s).is_file()})
        if missing:
            raise CheckpointFormatError(
                f"{self.directory}: shard(s) {missing} named in {INDEX_FILE} are missing."
            )

    def _weight_map(self) -> Dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                return json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointFormatError(f"{index} has no readable weight_map: {exc}") from exc
        if (self.directory / SINGLE_FILE).is_file():
            with self._open(SINGLE_FILE) as handle:
                return {name: SINGLE_FILE for name in handle.keys()}
        raise CheckpointFormatError(
            f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found."
        )

    def _open(self, shard: str):
        try:
            return safe_open(self.directory / shard, framework="pt")
        except (SafetensorError, OSError) as exc:
            raise CheckpointFormatError(
                f"{self.directory / shard} is not a readable safetensors file: {exc}"
            ) from exc

    def _read(self, name: str, read: Callable[[Any], T]) -> T:
        """`read(handle)` on the open shard that holds `name`."""
        shard = self._shard_of.get(name)
        if shard is None:
            raise CheckpointFormatError(f"{self.directory}: tensor {name!r} is not in the checkpoint.")
        # A shard is opened per read: safetensors maps the file, and every page a read touches
        # would stay resident (and counted against this process) for as long as the shard is
        # open. Closed at once, the pages go with the tensor. Opening costs a header parse.
        try:
            with self._open(shard) as handle:
                return read(handle)
        except SafetensorError as exc:
            raise CheckpointFormatError(
                f"{self.directory / shard}: cannot read {name!r}, which {INDEX_FILE} places "
                f"there: {exc}"
            ) from exc

    def names(self) -> List[str]:
        """Tensor names, without the FP8 scale companions."""
        return [n for n in self._shard_of if not n.endswith(SCALE_SUFFIX)]

    def shard_of(self, name: str) -> str:
        return self._shard_of[name]

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Name -> shape of every tensor (scale companions included), from the shard headers.
        Raises CheckpointFormatError for a tensor the index places in a shard that lacks it."""
        found: Dict[str, Tuple[int, ...]] = {}
        for shard in sorted(set(self._shard_of.values())):
            with self._open(shard) as handle:
                held = set(handle.keys())
                wanted = [name for name, where in self._shard_of.items() if where == shard]
                absent = [name for name in wanted if name not in held]
                if absent:
                    raise CheckpointFormatError(
                        f"{self.directory / shard} does not hold {absent[0]!r}, which {INDEX_FILE} "
                        f"places there ({len(absent)} such tensors)."
                    )
                found.update((name, tuple(handle.get_slice(name).get_shape())) for name in wanted)
        return found

    def get(self, name: str) -> Tensor:
        """The tensor `name`; FP8 weights with a `<name>_scale_inv` come back dequantised (fp32)."""
        tensor = self._read(name, lambda handle: handle.get_tensor(name))
        scale_name = name + SCALE_SUFFIX
        if scale_name in self._shard_of:
            scale_inv = self._read(scale_name, lambda handle: handle.get_tensor(scale_name))
            tensor = dequantize_fp8_blocks(tensor, scale_inv)
        return tensor


def refuse_existing_output(directory: Path, overwrite: bool) -> None:
    """Raise FileExistsError when `directory` holds anything and `overwrite` is not set."""
    directory = Path(directory)
    if not overwrite and directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{directory} already exists and is not empty; replace it with --overwrite "
            "(overwrite=True)."
        )


class HFCheckpointWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards of at most
    `max_shard_bytes` plus the index, atomically: everything goes to `<dir>.tmp` first, and
    `finish` renames it into place (replacing an existing `<dir>` only with `overwrite`)."""

    def __init__(self, directory: str | Path, config: dict, max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False):
        self.directory = Path(directory)
        refuse_existing_output(self.directory, overwrite)
        self.overwrite = overwrite
        self.tmp = self.directory.with_name(self.directory.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def reserve(self, nbytes: int) -> None:
        """Close the current shard now if `nbytes` more would not fit in it, so that a caller
        about to read that much does not hold a full buffer at the same time."""
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._buffer or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} added twice.")
        size = tensor.numel() * tensor.element_size()
        self.reserve(size)
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() > size:
            # A view would keep its whole base (e.g. all experts of a layer) alive in the buffer.
            tensor = tensor.clone()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self.total_bytes += size

    @property
    def held_bytes(self) -> int:
        """Memory the buffered tensors keep alive (their storages)."""
        return sum(t.untyped_storage().nbytes() for t in self._buffer.values())

    def _flush(self) -> None:
        save_file(self._buffer, self.tmp / f"part-{len(self._shards):05d}.safetensors",
                  metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def copy_files(self, source: Path, names: Iterable[str]) -> List[str]:
        """Copy the side files (tokenizer, generation config) of `names` that exist in
        `source`; returns those copied."""
        copied = [name for name in names if (Path(source) / name).is_file()]
        for name in copied:
            shutil.copy2(Path(source) / name, self.tmp / name)
        return copied

    def finish(self) -> Path:
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp / f"part-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        # Checked again: another writer may have created it meanwhile.
        refuse_existing_output(self.directory, self.overwrite)
        publish_dir(self.tmp, self.directory)
        return self.directory

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
