"""Conversions fail with a clear message and write nothing: a non-Ling architecture, a missing
shard, a tensor config.json does not explain, a TP that does not divide the heads, an output
that already holds a checkpoint (unless --overwrite); a model config that does not fit the
checkpoint on export; a Ling checkpoint loaded into the hybrid without conversion."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.hf_config import model_config_from_hf
from ring_train.checkpoint.marker import read_marker
from ring_train.checkpoint.streaming import CheckpointReader
from ring_train.checkpoint.training_checkpoint import load_weights
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.transformer_config import to_transformer_config
from tests.conversion.tools import convert
from tests.reference.hf_checkpoint import INDEX_FILE, tiny_ling_config, write_ling_checkpoint

HYBRID_ARGS = ["--layer-group-size", "2", "--group-norm-size", "2"]
SOFTMAX = ["--target", "softmax"]


@pytest.fixture
def ling(tmp_path):
    write_ling_checkpoint(tmp_path / "ling", tiny_ling_config(), num_shards=3)
    return tmp_path / "ling"


def _import(source, output, *args) -> int:
    return convert.main(["import", "--hf", str(source), "--out", str(output), "--quiet", *args])


def _edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _add_unexpected_tensor(directory):
    save_file({"model.layers.0.attention.rotary_emb.inv_freq": torch.ones(8)}, directory / "extra.safetensors")
    index = json.loads((directory / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.attention.rotary_emb.inv_freq"] = "extra.safetensors"
    (directory / INDEX_FILE).write_text(json.dumps(index))


BROKEN = {
    "non_ling_architecture": (
        lambda d: _edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
        SOFTMAX, "model_type='llama'",
    ),
    "missing_shard": (
        lambda d: (d / "model-00002-of-00003.safetensors").unlink(),
        SOFTMAX, "['model-00002-of-00003.safetensors'] named in model.safetensors.index.json are missing",
    ),
    "shape_contradicts_config": (
        lambda d: _edit_config(d, intermediate_size=96),
        SOFTMAX, "model.layers.0.mlp.gate_proj.weight in model-00001-of-00003.safetensors has shape "
            "(128, 64), config.json implies (96, 64)",
    ),
    "tensor_config_does_not_explain": (
        _add_unexpected_tensor, SOFTMAX, "model.layers.0.attention.rotary_emb.inv_freq (shape (8,)) is not part",
    ),
    "tp_does_not_divide_heads": (
        lambda d: None, [*HYBRID_ARGS, "--tensor-parallel", "3"],
        "tensor_parallel=3 does not divide model.num_attention_heads=4",
    ),
    "hybrid_without_layer_groups": (
        lambda d: None, [], "needs layer_group_size and group_norm_size",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_import_says_why_and_writes_nothing(case, ling, tmp_path, capsys):
    breaks, args, message = BROKEN[case]
    breaks(ling)
    assert _import(ling, tmp_path / "out", *args) == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ling"]


def test_existing_checkpoint_stays_unless_overwrite(ling, tmp_path, capsys):
    output = tmp_path / "out"
    assert _import(ling, output, *HYBRID_ARGS, "--gate-init", "normal", "--gate-seed", "1") == 0
    before = read_marker(output)
    gate = lambda: CheckpointReader(output).tensor("decoder.layers.0.self_attention.linear_qkvg.weight")
    first = gate()
    assert _import(ling, output, *HYBRID_ARGS, "--gate-init", "normal", "--gate-seed", "2") == 1
    assert "already exists" in capsys.readouterr().err
    assert read_marker(output) == before and torch.equal(gate(), first)
    assert _import(ling, output, *HYBRID_ARGS, "--gate-init", "normal", "--gate-seed", "2", "--overwrite") == 0
    assert not torch.equal(gate(), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ling", "out"]


def test_export_refuses_a_model_config_that_does_not_fit(softmax_checkpoint, tmp_path, capsys):
    output = tmp_path / "hf"
    code = convert.main(["export", "--checkpoint", str(softmax_checkpoint), "--out", str(output),
                         "--model-config", "tiny", "--quiet"])
    assert code == 1
    assert "shape mismatch for embedding.word_embeddings.weight" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ling_checkpoint_does_not_load_into_the_hybrid(ling_fp32, softmax_checkpoint, one_process):
    cfg = model_config_from_hf(ling_fp32.config, layer_group_size=2, group_norm_size=2)
    model = build_model(cfg, to_transformer_config(cfg, ParallelConfig()))
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(CheckpointError, match="decoder.layers.0.self_attention.linear_qkvg.weight"):
        load_weights(softmax_checkpoint, [model])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
