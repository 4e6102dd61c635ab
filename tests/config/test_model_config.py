"""Bad model and parallel configs fail fast with a message naming the field."""

import pytest

from ring_train.config.errors import ConfigError
from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig, check_layout


def _tiny(**overrides):
    return load_model_config("tiny", **overrides)


@pytest.mark.parametrize(
    "overrides, parallel, field",
    [
        ({}, dict(tensor_parallel=3), "num_attention_heads"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2, "group_norm_size": 4},
         dict(tensor_parallel=4), "num_key_value_heads"),
        ({"group_norm_size": 1}, dict(tensor_parallel=2), "group_norm_size"),
        ({}, dict(expert_parallel=3), "num_experts"),
        ({}, dict(pipeline_parallel=3), "num_hidden_layers"),
        ({}, dict(pipeline_parallel=2, virtual_pipeline_parallel=4), "num_hidden_layers"),
        ({}, dict(tensor_parallel=2, sequence_parallel=False), "sequence_parallel"),
        ({}, dict(context_parallel=2), "context_parallel"),
    ],
)
def test_layout_that_cannot_shard_the_model_is_refused(overrides, parallel, field):
    with pytest.raises(ConfigError, match=field):
        check_layout(_tiny(**overrides), ParallelConfig(**parallel))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"n_group": 3}, "n_group"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"group_norm_size": 3}, "group_norm_size"),
        ({"num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"topk_group": 8}, "topk_group"),
        ({"decay_variant": "C"}, "decay_variant"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_inconsistent_model_config_is_refused(overrides, field):
    with pytest.raises(ConfigError, match=field):
        _tiny(**overrides)


def test_unknown_model_key_and_missing_preset_are_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        _tiny(hiden_size=64)
    with pytest.raises(ConfigError, match="not found"):
        load_model_config("medium")


def test_valid_layouts_pass():
    check_layout(_tiny(), ParallelConfig(tensor_parallel=2, expert_parallel=2))
    check_layout(load_model_config("mini"), ParallelConfig(tensor_parallel=4, expert_parallel=8,
                                                            pipeline_parallel=4))
    check_layout(load_model_config("flash"), ParallelConfig(tensor_parallel=4, expert_parallel=8,
                                                             pipeline_parallel=8))


def test_all_softmax_model_has_no_norm_group_constraint():
    check_layout(_tiny(layer_group_size=1, group_norm_size=1), ParallelConfig(tensor_parallel=2))
