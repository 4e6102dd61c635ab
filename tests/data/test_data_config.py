"""DataConfig refuses what cannot work, at start-up, naming the field and the fix."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from ring_train.config.data import DataConfig
from ring_train.config.errors import ConfigError


def test_default_is_the_built_in_corpus_with_the_byte_tokenizer():
    config = DataConfig()
    assert config.blend == [{"path": "default", "weight": 1.0}]
    assert config.uses_default_corpus and config.tokenizer == "byte"


def test_missing_data_file_names_the_path_and_the_files_looked_for(tmp_path):
    prefix = tmp_path / "corpus" / "web"
    with pytest.raises(ConfigError) as error:
        DataConfig(blend=[{"path": str(prefix), "weight": 1.0}])
    message = str(error.value)
    assert f"data.blend[0].path='{prefix}'" in message
    assert f"{prefix}.bin and {prefix}.idx" in message
    assert "tools/preprocess_data.py" in message


def test_a_dataset_missing_only_its_index_names_the_index(make_dataset):
    prefix = make_dataset("web", ["some text"])
    Path(prefix + ".idx").unlink()
    with pytest.raises(ConfigError, match=rf"missing {prefix}\.idx\."):
        DataConfig(blend=[{"path": prefix, "weight": 1.0}])


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "heavy", True])
def test_weights_that_are_not_positive_numbers_are_refused(make_dataset, weight):
    prefix = make_dataset("web", ["some text"])
    with pytest.raises(ConfigError, match=r"data.blend\[1\].weight"):
        DataConfig(blend=[{"path": prefix, "weight": 1.0}, {"path": prefix, "weight": weight}])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(blend=[]), "data.blend is empty"),
        (dict(blend=[{"path": "default"}]), r"data.blend\[0\]"),
        (dict(blend=[{"path": "default", "weight": 1, "wieght": 2}]), r"data.blend\[0\]"),
        (dict(tokenizer="missing/tokenizer.json"), "data.tokenizer='missing/tokenizer.json'"),
        (dict(eod_token="</s>"), "data.eod_token"),
        (dict(validation_fraction=1.0), "data.validation_fraction"),
        (dict(validation_fraction=-0.1), "data.validation_fraction"),
        (dict(num_workers=-1), "data.num_workers"),
    ],
)
def test_bad_values_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        DataConfig(**overrides)


def test_built_in_corpus_with_another_tokenizer_is_refused(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    with pytest.raises(ConfigError, match="built-in corpus, which is byte-tokenized"):
        DataConfig(tokenizer=str(tokenizer))


def test_hydra_schema_refuses_unknown_keys_and_wrong_types_and_validates_on_creation():
    schema = OmegaConf.structured(DataConfig)
    with pytest.raises(ConfigKeyError, match="blnd"):
        OmegaConf.merge(schema, {"blnd": []})
    with pytest.raises(ValidationError, match="validation_fraction"):
        OmegaConf.merge(schema, {"validation_fraction": "a lot"})
    with pytest.raises(ConfigError, match=r"data.blend\[0\].weight"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"blend": [{"path": "default", "weight": 0}]}))
