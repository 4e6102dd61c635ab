"""A Ling-2.0 checkpoint of the tiny recipe's backbone, imported to the hybrid, is what the
recipe loads as `init_from` (the trainer's load_weights into the recipe's model), and the
import records that very model; MTP layers can be left out."""

import dataclasses

import torch

from ring_train.checkpoint.hf_config import model_config_to_hf
from ring_train.checkpoint.hf_import import ImportOptions, import_hf_checkpoint
from ring_train.checkpoint.marker import read_marker
from ring_train.checkpoint.model_record import model_config_for
from ring_train.checkpoint.streaming import CheckpointReader
from ring_train.checkpoint.training_checkpoint import load_weights
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.transformer_config import to_transformer_config
from ring_train.training.setup import build_model_chunks
from tests.reference.hf_checkpoint import random_hf_state_dict, write_hf_checkpoint


def _ling_backbone_of(recipe_model):
    ling = dataclasses.replace(recipe_model, layer_group_size=1,
                               group_norm_size=recipe_model.num_attention_heads)
    return model_config_to_hf(ling)


def test_imported_hybrid_loads_as_the_tiny_recipe_init(tmp_path, one_process):
    recipe = load_model_config("tiny")
    config = _ling_backbone_of(recipe)
    write_hf_checkpoint(tmp_path / "ling", config, random_hf_state_dict(config, seed=4), num_shards=2)
    options = ImportOptions(layer_group_size=recipe.layer_group_size, group_norm_size=recipe.group_norm_size)
    checkpoint = import_hf_checkpoint(tmp_path / "ling", tmp_path / "init", options)
    recorded = model_config_for(read_marker(checkpoint), checkpoint, None)
    assert dataclasses.asdict(recorded) == dataclasses.asdict(recipe)
    chunks = build_model_chunks(recipe, to_transformer_config(recipe, ParallelConfig()))
    load_weights(checkpoint, chunks)
    embedding = chunks[0].embedding.word_embeddings.weight
    assert torch.equal(embedding, CheckpointReader(checkpoint).tensor("embedding.word_embeddings.weight").float())


def test_mtp_layers_can_be_left_out(tmp_path):
    recipe = load_model_config("tiny")
    config = _ling_backbone_of(recipe)
    write_hf_checkpoint(tmp_path / "ling", config, random_hf_state_dict(config, seed=4), num_shards=2)
    options = ImportOptions(target="softmax", keep_mtp=False)
    checkpoint = import_hf_checkpoint(tmp_path / "ling", tmp_path / "no_mtp", options)
    keys = CheckpointReader(checkpoint).tensors
    assert keys and not any(key.startswith("mtp.") for key in keys)
    assert model_config_for(read_marker(checkpoint), checkpoint, None).num_nextn_predict_layers == 0
