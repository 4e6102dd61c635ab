"""Parameter counts from the configs against the paper, and against the built model."""

import pytest

from ring_train.config.model import load_model_config
from ring_train.model.params import count_parameters

# arXiv 2510.19338 / model cards: total and activated parameters.
PAPER = {"mini": (16.4e9, 1.6e9), "flash": (104.2e9, 7.4e9)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_param_counts_match_paper_within_1_percent(name):
    count = count_parameters(load_model_config(name))
    total, active = PAPER[name]
    assert abs(count.total - total) / total < 0.01, count
    assert abs(count.active - active) / active < 0.01, count


def test_mini_non_embedding_active_matches_model_card():
    # The Ring-mini-linear-2.0 card: 957M non-embedding activated parameters.
    count = count_parameters(load_model_config("mini"))
    assert abs(count.active_non_embedding - 957e6) / 957e6 < 0.005


def test_layer_pattern_of_presets():
    assert load_model_config("mini").softmax_layers == [4, 9, 14, 19]
    assert load_model_config("flash").softmax_layers == [7, 15, 23, 31]
    # Tail layers beyond the last full group are softmax.
    assert load_model_config("tiny", num_hidden_layers=5).softmax_layers == [1, 3, 4]
    all_softmax = load_model_config("tiny", layer_group_size=1)
    assert all_softmax.softmax_layers == list(range(all_softmax.num_hidden_layers))
