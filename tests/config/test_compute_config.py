"""The `compute` group: presets compose onto the schema, and bad combinations are refused."""

import pytest

from ring_train.config.compute import ComputeConfig
from ring_train.config.errors import ConfigError
from ring_train.config.hydra import compose_recipe, to_train_config


@pytest.mark.parametrize("preset, fp8", [("reference", "none"), ("fused", "none"),
                                         ("fp8_blockwise", "blockwise"),
                                         ("fp8_tensorwise", "tensorwise"),
                                         ("fp8_tensorwise_delayed", "tensorwise_delayed")])
def test_presets_compose(preset, fp8):
    cfg = to_train_config(compose_recipe(["recipe=small", f"compute={preset}"]))
    assert cfg.compute.fp8 == fp8
    assert cfg.compute.fused_kernels == (preset != "reference")


def test_default_is_the_reference_path():
    assert to_train_config(compose_recipe(["recipe=tiny"])).compute == ComputeConfig()


def test_unknown_fp8_recipe_is_refused():
    with pytest.raises(ConfigError, match="compute.fp8='mxfp8'"):
        ComputeConfig(fp8="mxfp8")


def test_fp8_needs_bf16_precision():
    with pytest.raises(ConfigError, match="needs precision=bf16"):
        to_train_config(compose_recipe(["recipe=tiny", "compute.fp8=blockwise"]))


def test_expert_recompute_needs_grouped_experts():
    with pytest.raises(ConfigError, match="grouped_experts"):
        ComputeConfig(recompute_experts=True)


def test_grouped_experts_need_expert_tensor_parallel_one():
    with pytest.raises(ConfigError, match="parallel.expert_tensor_parallel=1"):
        to_train_config(compose_recipe(["recipe=small", "compute=fused",
                                        "parallel.tensor_parallel=2"]))
    cfg = to_train_config(compose_recipe(["recipe=small", "compute=fused", "parallel.tensor_parallel=2",
                                          "parallel.expert_tensor_parallel=1"]))
    assert cfg.parallel.expert_tensor_parallel_size == 1
