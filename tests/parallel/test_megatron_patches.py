"""apply_patches: refuses unknown names; on a GPU it applies only the no-TE fixes."""

import importlib.util

import pytest
import torch

from ring_train.parallel.megatron_patches import (
    applied_patches,
    apply_patches,
    no_te_fix_names,
    patch_names,
    remove_patches,
)


def test_unknown_patch_name_is_an_error_not_a_skip_of_nothing():
    before = applied_patches()
    with pytest.raises(ValueError, match=r"unknown patch names \['no_such_patch'\]"):
        apply_patches(skip=["no_such_patch"])
    assert applied_patches() == before


def test_no_te_fixes_are_registered_patches():
    assert set(no_te_fix_names()) == {
        "router_gemm_without_te",
        "distopt_fresh_adam_state",
        "distopt_step_per_param",
        "distopt_state_copy_skips_step",
    }
    assert set(no_te_fix_names()) < set(patch_names())


@pytest.mark.gpu
def test_gpu_gets_only_the_no_te_fixes():
    current_device = torch.cuda.current_device
    remove_patches()
    try:
        apply_patches()
        expected = () if importlib.util.find_spec("transformer_engine") else no_te_fix_names()
        assert applied_patches() == expected
        assert torch.cuda.current_device is current_device  # CPU patches stay off
    finally:
        remove_patches()
        apply_patches()  # leave the session as the other tests expect it
