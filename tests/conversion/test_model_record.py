"""Which model a checkpoint holds: recorded by the import, or named by a recipe model, a model
YAML, a run's config.yaml or an HF config.json; a clear error when neither."""

import json

import pytest
import yaml

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.hf_config import model_config_to_hf
from ring_train.checkpoint.marker import CompletionMarker
from ring_train.checkpoint.model_record import load_model_description, model_config_for
from ring_train.config.model import MODEL_PRESETS_DIR, load_model_config


def test_every_description_of_the_tiny_model_gives_it(tmp_path):
    tiny = load_model_config("tiny")
    run_config = {"recipe": "tiny", "model": yaml.safe_load((MODEL_PRESETS_DIR / "tiny.yaml").read_text()),
                  "seed": 3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_config))
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(tiny)))
    for spec in ("tiny", str(MODEL_PRESETS_DIR / "tiny.yaml"), str(tmp_path / "config.yaml"),
                 str(tmp_path / "config.json")):
        assert load_model_description(spec) == tiny, spec


def test_an_unrecorded_model_must_be_named(tmp_path):
    marker = CompletionMarker(kind="weights", step=1, files={}, model_keys=[], model_objects=[])
    with pytest.raises(CheckpointError, match="does not record its model"):
        model_config_for(marker, tmp_path, None)
    assert model_config_for(marker, tmp_path, "tiny") == load_model_config("tiny")
