"""Round trips are bit-exact: HF -> framework -> HF (Ling-2.0, Ring-linear-2.0, with MTP, with
the tokenizer files), FP8 sources come in dequantised, and a checkpoint saved at TP=2, PP=2,
EP=2 goes to HF and back into a TP=1 model unchanged."""

import json

import pytest
import torch

from ring_train.checkpoint.hf_export import export_hf_checkpoint
from ring_train.checkpoint.hf_import import ImportOptions, import_hf_checkpoint
from ring_train.checkpoint.training_checkpoint import load_weights, save_weights
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import to_transformer_config
from ring_train.parallel.distributed import destroy_distributed, init_distributed
from ring_train.testing.global_weights import fill_global_weights
from ring_train.testing.multiprocess import run_ranks
from ring_train.training.setup import build_model_chunks
from tests.conversion.tools import convert
from tests.reference.hf_checkpoint import (
    load_hf_checkpoint,
    random_hf_state_dict,
    tiny_ling_config,
    tiny_ring_config,
    write_hf_checkpoint,
    write_ling_checkpoint,
    write_ring_linear_checkpoint,
)

TOKENIZER = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"eos_token": "<|eos|>"}'}


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def _cli_round_trip(source, tmp_path, *import_args):
    checkpoint, output = tmp_path / "checkpoint", tmp_path / "exported"
    assert convert.main(["import", "--hf", str(source), "--out", str(checkpoint), "--quiet", *import_args]) == 0
    assert convert.main(["export", "--checkpoint", str(checkpoint), "--out", str(output), "--quiet"]) == 0
    return load_hf_checkpoint(output), output


def test_ling_hf_to_framework_to_hf_is_bit_exact(tmp_path):
    source = tmp_path / "ling"
    config = tiny_ling_config(num_nextn_predict_layers=1)
    state = write_ling_checkpoint(source, config, num_shards=3)  # bf16, fp32 expert bias
    for name, text in TOKENIZER.items():
        (source / name).write_text(text)
    (exported_config, exported), output = _cli_round_trip(source, tmp_path, "--target", "softmax")
    _assert_same_tensors(exported, state)
    source_config = json.loads((source / "config.json").read_text())
    assert {k: exported_config.get(k) for k in source_config} == source_config
    for name, text in TOKENIZER.items():
        assert (output / name).read_text() == text


def test_ring_linear_hf_to_framework_to_hf_is_bit_exact(tmp_path):
    source = tmp_path / "ring"
    state = write_ring_linear_checkpoint(source, tiny_ring_config(num_nextn_predict_layers=1))
    (exported_config, exported), _ = _cli_round_trip(source, tmp_path)
    _assert_same_tensors(exported, state)
    source_config = json.loads((source / "config.json").read_text())
    assert {k: exported_config.get(k) for k in source_config} == source_config


def _fp8_blocks(weight: torch.Tensor, block: int = 128):
    """(e4m3 weight, fp32 scales [ceil(M/b), ceil(N/b)]) with scale = block amax / 448."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -cols % block, 0, -rows % block))
    blocks = padded.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [Mb, b, Nb, b]
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def test_fp8_block_quantised_source_imports_dequantised(tmp_path):
    config = {**tiny_ling_config(), "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    state = random_hf_state_dict(config, dtype=torch.float32, seed=2)
    stored, dequantised = {}, {}
    for name, tensor in state.items():
        if name.endswith(("query_key_value.weight", "dense.weight", "_proj.weight")):
            weight, scale = _fp8_blocks(tensor)
            stored.update({name: weight, name + "_scale_inv": scale})
            dequantised[name] = weight.float() * scale.repeat_interleave(128, 0)[: tensor.shape[0]] \
                .repeat_interleave(128, 1)[:, : tensor.shape[1]]
        else:
            stored[name] = dequantised[name] = tensor
    write_hf_checkpoint(tmp_path / "fp8", config, stored, num_shards=2)
    checkpoint = import_hf_checkpoint(tmp_path / "fp8", tmp_path / "checkpoint",
                                      ImportOptions(target="softmax", dtype=torch.float32))
    export_hf_checkpoint(checkpoint, tmp_path / "exported", dtype=torch.float32)
    _, exported = load_hf_checkpoint(tmp_path / "exported")
    _assert_same_tensors(exported, dequantised)
    assert any(not torch.equal(dequantised[n], state[n]) for n in state)  # quantisation happened


# ---- TP=2, PP=2, EP=2 -> HF -> TP=1 ------------------------------------------------------------


def _save_at_tp2_pp2_ep2(rank, save_dir):
    init_distributed(tensor_parallel=2, pipeline_parallel=2, expert_parallel=2, expert_tensor_parallel=1)
    try:
        cfg = load_model_config("tiny")
        parallel = ParallelConfig(tensor_parallel=2, pipeline_parallel=2, expert_parallel=2,
                                  expert_tensor_parallel=1)
        chunks = build_model_chunks(cfg, to_transformer_config(cfg, parallel))
        fill_global_weights(chunks)
        return str(save_weights(save_dir, 1, chunks))
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_tp2_pp2_ep2_checkpoint_to_hf_and_back_to_tp1_is_bit_exact(tmp_path):
    saved = run_ranks(_save_at_tp2_pp2_ep2, 4, str(tmp_path / "run"), timeout=300)[0]
    cfg = load_model_config("tiny")
    export_hf_checkpoint(saved, tmp_path / "hf", cfg, dtype=torch.float32)
    reimported = import_hf_checkpoint(tmp_path / "hf", tmp_path / "reimported")
    init_distributed()
    try:
        config = to_transformer_config(cfg, ParallelConfig())
        original, loaded = build_model(cfg, config), build_model(cfg, config)
        fill_global_weights([original])
        load_weights(reimported, [loaded])
        want = {k: v for k, v in original.state_dict().items() if isinstance(v, torch.Tensor)}
        got = {k: v for k, v in loaded.state_dict().items() if isinstance(v, torch.Tensor)}
        _assert_same_tensors(got, want)
    finally:
        destroy_distributed()
