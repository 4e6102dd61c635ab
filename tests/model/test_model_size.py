"""The parameter-count formula equals the parameters the builder creates."""

import pytest

from ring_train.config.model import load_model_config
from ring_train.config.parallel import ParallelConfig
from ring_train.model.builder import build_model
from ring_train.model.params import count_parameters
from ring_train.model.transformer_config import to_transformer_config


@pytest.mark.parametrize(
    "overrides",
    [{}, {"layer_group_size": 1}, {"num_hidden_layers": 5}, {"num_nextn_predict_layers": 0}],
    ids=["tiny", "all-softmax", "tail-softmax-layer", "no-mtp"],
)
def test_formula_counts_built_parameters(single_process, overrides):
    cfg = load_model_config("tiny", **overrides)
    model = build_model(cfg, to_transformer_config(cfg, ParallelConfig()))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
