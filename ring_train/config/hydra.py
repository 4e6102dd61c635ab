"""Hydra: the recipes in `recipes/` compose onto the typed TrainConfig schema.

Registering the schema makes every key and type checked at composition: a misspelled key or
a wrong type fails before anything runs. `to_train_config` then builds the dataclasses, whose
`__post_init__` checks cross-field rules (layouts, stages, data files).
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ring_train.config.schema import TrainConfig

SCHEMA_NAME = "train_schema"
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """The validated TrainConfig of a composed Hydra config (interpolations resolved)."""
    return OmegaConf.to_object(cfg)


def compose_recipe(overrides: list[str]) -> DictConfig:
    """Compose `recipes/config.yaml` with command-line style overrides, outside a Hydra app
    (tools and tests)."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)
