"""HF directory reading and writing: FP8 block dequantisation, sharding by size with an index,
atomic publication, and tensors that share storage."""

import json

import pytest
import torch

from ring_train.checkpoint.hf_io import (
    INDEX_FILE,
    CheckpointFormatError,
    HFCheckpointReader,
    HFCheckpointWriter,
    dequantize_fp8_blocks,
)
from tests.reference.hf_checkpoint import load_hf_checkpoint


def test_fp8_dequantisation_scales_each_block_by_its_own_scale():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 200, generator=generator).to(torch.float8_e4m3fn)  # 3 x 2 blocks
    scales = torch.rand(3, 2, generator=generator) + 0.5
    got = dequantize_fp8_blocks(weight, scales)
    for i in range(3):
        for j in range(2):
            block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            assert torch.equal(got[block], weight[block].float() * scales[i, j])


def test_fp8_scales_of_another_block_size_are_refused():
    with pytest.raises(CheckpointFormatError, match=r"need \(3, 2\)"):
        dequantize_fp8_blocks(torch.zeros(300, 200).to(torch.float8_e4m3fn), torch.ones(5, 4))


def test_writer_shards_by_size_and_indexes_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    writer = HFCheckpointWriter(tmp_path / "out", {"model_type": "x"}, max_shard_bytes=2048)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 5 * 1024
    config, loaded = load_hf_checkpoint(tmp_path / "out")
    assert config == {"model_type": "x"} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left


def test_writer_buffers_a_view_without_its_base(tmp_path):
    # One expert sliced out of a layer's stacked experts must not keep all of them in memory
    # until the shard is written.
    experts = torch.arange(4 * 6.0).view(4, 3, 2)
    writer = HFCheckpointWriter(tmp_path / "out", {})
    writer.add("expert1", experts[1])
    assert writer.held_bytes == 6 * 4
    writer.finish()
    assert torch.equal(HFCheckpointReader(tmp_path / "out").get("expert1"), experts[1])


def test_writer_refuses_an_existing_output_before_writing_and_replaces_it_on_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        HFCheckpointWriter(tmp_path / "out", {})
    assert not (tmp_path / "out.tmp").exists()
    writer = HFCheckpointWriter(tmp_path / "out", {}, overwrite=True)
    writer.add("t", torch.ones(2))
    writer.finish()
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert torch.equal(HFCheckpointReader(tmp_path / "out").get("t"), torch.ones(2))


def test_reader_names_the_shard_the_index_misplaces_a_tensor_in(tmp_path):
    writer = HFCheckpointWriter(tmp_path / "hf", {})
    writer.add("t", torch.ones(2))
    writer.finish()
    index_path = tmp_path / "hf" / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00001.safetensors"
    index_path.write_text(json.dumps(index))
    reader = HFCheckpointReader(tmp_path / "hf")
    with pytest.raises(CheckpointFormatError, match="model-00001-of-00001.safetensors does not hold 'ghost'"):
        reader.shapes()
    with pytest.raises(CheckpointFormatError, match="model-00001-of-00001.safetensors: cannot read 'ghost'"):
        reader.get("ghost")
