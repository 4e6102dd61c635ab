"""Which model a checkpoint holds.

A torch_dist checkpoint stores tensors, not the architecture behind them. The HF import
records its ModelConfig in the completion marker's details; for any other checkpoint the
model is named by the user: a recipe model name, a model YAML, a run's `config.yaml` (its
`model` section) or an HF `config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from ring_train.checkpoint.errors import CheckpointError
from ring_train.checkpoint.hf_config import model_config_from_hf
from ring_train.checkpoint.marker import CompletionMarker
from ring_train.config.errors import ConfigError
from ring_train.config.model import ModelConfig, load_model_config

MODEL_CONFIG = "model_config"
# config.json fields of the source that ModelConfig does not carry (token ids), for export.
HF_EXTRA = "hf_config_extra"
HF_EXTRA_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_details(cfg: ModelConfig, hf_config: Dict[str, Any], **facts: Any) -> Dict[str, Any]:
    """Marker details that record `cfg` and the source config.json's extra fields."""
    extra = {k: hf_config[k] for k in HF_EXTRA_FIELDS if k in hf_config}
    return {MODEL_CONFIG: asdict(cfg), HF_EXTRA: extra, **facts}


def load_model_description(spec: str) -> ModelConfig:
    """The ModelConfig named by `spec`: a recipe model name (`tiny`, `mini`, `flash`), a model
    YAML, a run's `config.yaml` (its `model` section) or an HF `config.json`."""
    path = Path(spec)
    if path.suffix == ".json":
        try:
            return model_config_from_hf(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model config {spec!r}: cannot read an HF config.json: {exc}") from exc
    if path.suffix in (".yaml", ".yml") and path.is_file():
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if isinstance(values, dict) and isinstance(values.get("model"), dict):
            return ModelConfig(**values["model"])
    return load_model_config(spec)


def model_config_for(marker: CompletionMarker, checkpoint: Path, given: Optional[str]) -> ModelConfig:
    """`given` (see load_model_description) if set, else the ModelConfig the import recorded."""
    if given is not None:
        return load_model_description(given)
    recorded = marker.details.get(MODEL_CONFIG)
    if recorded is None:
        raise CheckpointError(
            f"{checkpoint} does not record its model (only imported checkpoints do); name it "
            "with a model config: a recipe model (tiny, mini, flash), a model YAML, the run's "
            "config.yaml or an HF config.json."
        )
    return ModelConfig(**recorded)
