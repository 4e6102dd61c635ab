"""CheckpointConfig and WSMConfig reject values that cannot work, naming the field."""

import pytest

from ring_train.config.checkpoint import CheckpointConfig, WSMConfig
from ring_train.config.errors import ConfigError


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"save_dir": ""}, "checkpoint.save_dir"),
        ({"save_interval": -1}, "checkpoint.save_interval"),
        ({"keep_last": 0}, "checkpoint.keep_last"),
        ({"load": ""}, "checkpoint.load"),
    ],
)
def test_checkpoint_config_errors_name_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        CheckpointConfig(**fields)


def test_checkpoint_config_defaults_resume_from_latest_and_keep_three():
    config = CheckpointConfig(save_dir="runs/x/checkpoints")
    assert (config.load, config.keep_last, config.exit_on_missing_checkpoint) == ("latest", 3, False)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"interval_steps": 0}, "wsm.interval_steps"),
        ({"num_candidates": 0}, "wsm.num_candidates"),
        ({"shape": "exponential"}, "wsm.shape"),
        ({"shape": "custom"}, "wsm.weights"),
        ({"shape": "custom", "num_candidates": 2, "weights": [1.0]}, "wsm.weights has 1"),
        ({"shape": "custom", "num_candidates": 2, "weights": [1.5, -0.5]}, ">= 0"),
        ({"shape": "custom", "num_candidates": 2, "weights": [0.5, 0.6]}, "sum to"),
        ({"shape": "1-sqrt", "weights": [1.0]}, "wsm.shape=custom"),
    ],
)
def test_wsm_config_errors_name_the_field(fields, named):
    with pytest.raises(ConfigError, match=named):
        WSMConfig(**fields)


def test_wsm_candidates_end_at_the_stage_end_interval_apart():
    config = WSMConfig(interval_steps=10, num_candidates=3)
    assert config.window_steps() == 30
    assert config.candidate_steps(100) == [80, 90, 100]
    assert config.candidate_steps(30) == [10, 20, 30]
    with pytest.raises(ConfigError, match="longer than the stage"):
        config.candidate_steps(29)
