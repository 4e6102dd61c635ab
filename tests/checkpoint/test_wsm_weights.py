"""WSM merge weights: the inverse map of ARCH_SPEC §6 applied to decay curves sampled at the
candidates, with uniform averaging as the linear curve."""

import math

import pytest

from ring_train.checkpoint.wsm import (
    DECAY_CURVES,
    config_merge_weights,
    decay_coefficients,
    merge_weights,
    merge_weights_from_decay,
)
from ring_train.config.checkpoint import WSMConfig

SHAPES = ["uniform", *DECAY_CURVES]


@pytest.mark.parametrize("n", [1, 2, 3, 8, 32])
def test_uniform_is_the_plain_mean(n):
    assert merge_weights("uniform", n) == pytest.approx([1.0 / n] * n, abs=1e-15)


@pytest.mark.parametrize("n", [2, 3, 8, 32])
def test_linear_decay_sampled_at_the_candidates_is_uniform_averaging(n):
    assert merge_weights("linear", n) == pytest.approx([1.0 / n] * n, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_weights_are_a_convex_combination(shape, n):
    weights = merge_weights(shape, n)
    assert len(weights) == n
    assert all(w >= 0 for w in weights)
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", list(DECAY_CURVES))
def test_weights_follow_the_inverse_map_of_the_sampled_decay(shape):
    n = 6
    f = DECAY_CURVES[shape]
    w = [f(i / n) for i in range(1, n)]  # w_1 .. w_5
    assert decay_coefficients(shape, n) == pytest.approx(w)
    c = merge_weights(shape, n)
    assert c[0] == pytest.approx(1 - w[0])
    for j in range(1, n - 1):
        assert c[j] == pytest.approx(w[j - 1] - w[j])
    assert c[-1] == pytest.approx(w[-1])
    # ...and back: the decay each update receives is the weight on it and everything newer.
    for i in range(1, n):
        assert math.fsum(c[i:]) == pytest.approx(w[i - 1])


def test_fast_early_decay_weights_the_oldest_candidate_most():
    # 1 - sqrt(t) drops fastest at the start: most of the "annealing" is already in θ_0.
    weights = merge_weights("1-sqrt", 8)
    assert weights[0] == max(weights) == pytest.approx(math.sqrt(1 / 8))
    # cosine decays slowly at both ends: the middle candidates weigh most.
    cosine = merge_weights("cosine", 8)
    assert max(cosine) in cosine[2:6] and cosine[0] < cosine[3] and cosine[-1] < cosine[4]


def test_decay_that_is_not_monotone_is_refused():
    with pytest.raises(ValueError, match="non-increasing"):
        merge_weights_from_decay([0.5, 0.7])
    with pytest.raises(ValueError, match="within"):
        merge_weights_from_decay([1.2])


def test_config_weights_come_from_the_shape_or_the_explicit_list():
    assert config_merge_weights(WSMConfig(num_candidates=4, shape="uniform")) == [0.25] * 4
    custom = WSMConfig(num_candidates=3, shape="custom", weights=[0.2, 0.3, 0.5])
    assert config_merge_weights(custom) == [0.2, 0.3, 0.5]
