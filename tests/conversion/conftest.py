"""Tiny HF checkpoints on disk, their imports, and a job of one process, shared by the
conversion tests (session scope: each conversion runs once)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ring_train.checkpoint.hf_export import export_hf_checkpoint
from ring_train.checkpoint.hf_import import SOFTMAX, ImportOptions, import_hf_checkpoint
from ring_train.checkpoint.ling_to_ring import GateInit
from ring_train.parallel.distributed import destroy_distributed, init_distributed
from tests.reference.hf_checkpoint import load_hf_checkpoint, tiny_ling_config, write_ling_checkpoint

# 4 layers, H=4, KV=2: layers 0 and 2 become lightning, 1 and 3 stay softmax, plus an MTP layer.
HYBRID = ImportOptions(layer_group_size=2, group_norm_size=2, gate=GateInit("normal", std=0.05, seed=7))


@dataclass
class HF:
    directory: Path
    config: dict
    state: dict


@pytest.fixture
def one_process():
    """megatron-core parallel state for a job of one process (TP = PP = EP = 1)."""
    init_distributed(seed=1234)
    yield
    destroy_distributed()


@pytest.fixture(scope="session")
def ling_fp32(tmp_path_factory) -> HF:
    """fp32 Ling-2.0 with an MTP layer in 3 shards; vocab 260 also holds the byte tokenizer."""
    directory = tmp_path_factory.mktemp("ling_fp32") / "hf"
    config = tiny_ling_config(num_nextn_predict_layers=1, vocab_size=260)
    state = write_ling_checkpoint(directory, config, num_shards=3, dtype=torch.float32, seed=5)
    return HF(directory, load_hf_checkpoint(directory)[0], state)


@pytest.fixture(scope="session")
def softmax_checkpoint(ling_fp32, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("softmax") / "checkpoint"
    return import_hf_checkpoint(ling_fp32.directory, output, ImportOptions(target=SOFTMAX))


@pytest.fixture(scope="session")
def hybrid_checkpoint(ling_fp32, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("hybrid") / "checkpoint"
    return import_hf_checkpoint(ling_fp32.directory, output, HYBRID)


@pytest.fixture(scope="session")
def hybrid_hf(hybrid_checkpoint, tmp_path_factory) -> HF:
    """The converted model as a Ring-linear HF directory, in fp32: the weights it holds."""
    directory = tmp_path_factory.mktemp("hybrid_hf") / "hf"
    export_hf_checkpoint(hybrid_checkpoint, directory, dtype=torch.float32)
    config, state = load_hf_checkpoint(directory)
    return HF(directory, config, state)
