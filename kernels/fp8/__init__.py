"""FP8 training kernels: the operand format (tensor.py), quantisers (quantize.py, reference.py),
the FP8 GEMM dispatch (gemm.py), the Triton GEMM with a quantising epilogue (triton_gemm.py), the
FP8 linear layer with its weight cache (linear.py) and two linear layers in a row quantising the
product between them in that epilogue (linear_pair.py).

The names below load on first use, so importing kernels.fp8.tensor or .reference (as the fused
producer kernels do) does not import Triton.
"""

import importlib

_EXPORTS = {
    "Fp8Tensor": "tensor",
    "GEMMS": "gemm", "fp8_gemm": "gemm",
    "RECIPES": "linear", "WEIGHT_CACHE": "linear", "Fp8WeightCache": "linear",
    "fp8_linear": "linear", "fp8_linear_pair": "linear_pair",
    "fp8_gemm_triton": "triton_gemm", "fp8_gemm_quantized": "triton_gemm",
    "quantize_columns": "quantize", "quantize_rows": "quantize",
    "quantize_rows_and_columns": "quantize", "quantize_weight": "quantize",
    "quantize_weight_and_transpose": "quantize", "transpose_fp8": "quantize",
    "dequantize": "reference", "fp8_gemm_reference": "reference",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
