"""Pretraining entry point: `torchrun [...] launch/pretrain.py recipe=<tiny|mini|flash> [key=value ...]`.

Composes `recipes/` onto the typed schema, validates everything (before any file is written),
then runs the recipe's stages on this process's share of the job. `--cfg job` prints the
composed config instead of running.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ring_train.config.errors import ConfigError
from ring_train.config.hydra import RECIPES_DIR, register_schema, to_train_config

register_schema()

CONFIG_ERROR_EXIT_CODE = 2


@hydra.main(config_path=str(RECIPES_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        train_config = to_train_config(cfg)
        from ring_train.training.trainer import train  # heavy imports once the config is valid

        if rank == 0:
            logging.getLogger("ring_train").info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
        train(train_config, OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT_CODE)


if __name__ == "__main__":
    main()
