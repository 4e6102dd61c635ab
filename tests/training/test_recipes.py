"""The recipes compose onto the typed schema and validate; mini and flash carry the paper's
stage settings and layouts that fit 8-GPU nodes."""

import pytest
from hydra.errors import ConfigCompositionException

from ring_train.config.hydra import compose_recipe, to_train_config
from ring_train.config.parallel import check_layout
from ring_train.model.params import count_parameters
from ring_train.parallel.distributed import validate_layout


def _validated(recipe, *overrides):
    # mini/flash point at cluster data; the built-in corpus lets them validate anywhere.
    return to_train_config(compose_recipe([f"recipe={recipe}", "data=builtin_corpus", *overrides]))


def test_tiny_runs_three_stages_with_growing_context():
    cfg = _validated("tiny")
    assert list(cfg.stages) == ["s4k", "s32k", "s128k"]
    lengths = [s.seq_length for s in cfg.stages.values()]
    assert lengths == sorted(lengths) and len(set(lengths)) == 3
    assert cfg.model.num_nextn_predict_layers == 1 and cfg.model.layer_group_size == 2


@pytest.mark.parametrize("recipe, tokens_4k", [("mini", 600e9), ("flash", 1000e9)])
def test_big_recipes_follow_the_paper(recipe, tokens_4k):
    cfg = _validated(recipe)
    s4k, s32k, s128k = cfg.stages.values()
    assert (s4k.seq_length, s32k.seq_length, s128k.seq_length) == (4096, 32768, 131072)
    assert s4k.train_tokens == tokens_4k
    assert s128k.rope_theta == 1e6  # the released Ring-linear-2.0 configs
    for stage in cfg.stages.values():
        assert stage.wsm.window_steps() <= stage.steps()
    assert cfg.precision == "bf16"


@pytest.mark.parametrize("recipe, world", [("mini", 8), ("mini", 64), ("flash", 64), ("flash", 128)])
def test_big_recipe_layouts_fit_8_gpu_nodes(recipe, world):
    cfg = _validated(recipe)
    p = cfg.parallel
    check_layout(cfg.model, p)
    validate_layout(world, p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_parallel,
                    p.expert_parallel, p.expert_tensor_parallel_size, p.context_parallel)
    assert 8 % p.tensor_parallel == 0  # tensor parallelism stays inside a node


def test_model_presets_in_recipes_have_the_paper_sizes():
    assert round(count_parameters(_validated("mini").model).total / 1e9, 1) == 16.4
    assert round(count_parameters(_validated("flash").model).total / 1e9, 1) == 104.2


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="optim.lerning_rate"):
        compose_recipe(["recipe=tiny", "optim.lerning_rate=1"])
    with pytest.raises(ConfigCompositionException, match="optim.lr"):
        compose_recipe(["recipe=tiny", "optim.lr=fast"])


def test_stage_and_cross_field_rules_name_the_field():
    from ring_train.config.errors import ConfigError

    with pytest.raises(ConfigError, match="stages.s4k: set exactly one"):
        _validated("tiny", "stages.s4k.train_tokens=1000")
    with pytest.raises(ConfigError, match="WSM window"):
        _validated("tiny", "stages.s32k.wsm.num_candidates=100")
    with pytest.raises(ConfigError, match="reset_state_at_eod"):
        _validated("tiny", "model.reset_state_at_eod=false")
    with pytest.raises(ConfigError, match="stage='s64k'"):
        _validated("tiny", "stage=s64k")
