"""Streaming access to HF checkpoint directories (config.json + safetensors shards).

The reader opens shards lazily and returns one tensor at a time (FP8 block-quantised weights
dequantised on the fly); the writer buffers tensors up to a shard size and writes the shards
and `model.safetensors.index.json` into a temporary directory renamed into place at the end,
so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"
FP8_BLOCK = 128


class CheckpointFormatError(ValueError):
    """An HF checkpoint directory that cannot be read as what it claims to be."""


def dequantize_fp8_blocks(weight: Tensor, scale_inv: Tensor, block: int = FP8_BLOCK) -> Tensor:
    """fp8 [M, N] with per-[block x block] scales [ceil(M/block), ceil(N/block)] -> fp32 [M, N]."""
    rows, cols = weight.shape
    scales = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scales


class HFCheckpointReader:
    """Tensors of an HF directory by name, read on demand from their shard."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise CheckpointFormatError(f"{config_path} not found: not an HF checkpoint directory.")
        self.config: dict = json.loads(config_path.read_text())
        self._shard_of = self._weight_map()
        missing = sorted({s for s in self._shard_of.values() if not (self.directory / s).is_file()})
        if missing:
            raise CheckpointFormatError(
                f"{self.directory}: shard(s) {missing} named in {INDEX_FILE} are missing."
            )
        self._open: Dict[str, object] = {}

    def _weight_map(self) -> Dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        if (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise CheckpointFormatError(
            f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found."
        )

    def _file(self, shard: str):
        if shard not in self._open:
            self._open[shard] = safe_open(self.directory / shard, framework="pt")
        return self._open[shard]

    def names(self) -> List[str]:
        """Tensor names, without the FP8 scale companions."""
        return [n for n in self._shard_of if not n.endswith(SCALE_SUFFIX)]

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._file(self._shard_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        """The tensor `name`; FP8 weights with a `<name>_scale_inv` come back dequantised (fp32)."""
        if name not in self._shard_of:
            raise CheckpointFormatError(f"{self.directory}: tensor {name!r} is not in the checkpoint.")
        tensor = self._file(self._shard_of[name]).get_tensor(name)
        scale_name = name + SCALE_SUFFIX
        if scale_name in self._shard_of:
            tensor = dequantize_fp8_blocks(tensor, self._file(self._shard_of[scale_name]).get_tensor(scale_name))
        return tensor

    def largest_shard_bytes(self) -> int:
        return max(os.path.getsize(self.directory / s) for s in set(self._shard_of.values()))


class HFCheckpointWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards of at most
    `max_shard_bytes` plus the index, atomically: everything goes to `<dir>.tmp` first."""

    def __init__(self, directory: str | Path, config: dict, max_shard_bytes: int = 5 * 2**30):
        self.directory = Path(directory)
        self.tmp = self.directory.with_name(self.directory.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.max_shard_bytes = max_shard_bytes
        self._buffer: Dict[str, Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self._buffer, self.tmp / f"part-{len(self._shards):05d}.safetensors",
                  metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def copy_files(self, source: Path, names: List[str]) -> None:
        """Copy side files (tokenizer, generation config) that exist in `source`."""
        for name in names:
            if (source / name).is_file():
                shutil.copy2(source / name, self.tmp / name)

    def finish(self, overwrite: bool = False) -> Path:
        if self._buffer:
            self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp / f"part-{i:05d}.safetensors", self.tmp / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if self.directory.exists():
            if not overwrite:
                raise FileExistsError(f"{self.directory} exists; pass overwrite to replace it.")
            shutil.rmtree(self.directory)
        os.replace(self.tmp, self.directory)
        return self.directory

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
