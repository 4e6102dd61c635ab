import pytest

from benchmarks.common import launch_config
from kernels.fp8 import triton_gemm

# The Triton FP8 GEMM in the interpreter: small tiles, so that test shapes have several tiles
# (partial ones included) and each of the 3 persistent programs loops over more than one.
SMALL_GEMM_TILES = dict(block_m=32, block_n=32, block_k=32, warps=4, stages=2, programs=3)


@pytest.fixture
def small_gemm_tiles():
    with launch_config(triton_gemm, **SMALL_GEMM_TILES):
        yield
