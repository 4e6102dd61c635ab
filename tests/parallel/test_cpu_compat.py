"""apply_cpu_patches: refuses unknown names, and leaves a CUDA machine alone."""

import pytest
import torch

from ring_train.parallel.cpu_compat import (
    applied_cpu_patches,
    apply_cpu_patches,
    remove_cpu_patches,
)


def test_unknown_patch_name_is_an_error_not_a_skip_of_nothing():
    before = applied_cpu_patches()
    with pytest.raises(ValueError, match=r"unknown CPU patch names \['no_such_patch'\]"):
        apply_cpu_patches(skip=["no_such_patch"])
    assert applied_cpu_patches() == before


@pytest.mark.gpu
def test_nothing_is_patched_where_cuda_exists():
    current_device = torch.cuda.current_device
    try:
        apply_cpu_patches()
        assert applied_cpu_patches() == ()
        assert torch.cuda.current_device is current_device
    finally:
        remove_cpu_patches()
