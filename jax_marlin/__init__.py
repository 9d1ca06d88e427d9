"""jax_marlin: 4-bit Marlin-format quantized matmuls for JAX (CPU and CUDA).

    qw = quantize(w, group_size=128)   # or pack(codes, scales), QuantizedWeight(...)
    y = marlin_matmul(x, qw)           # x (..., K) float16/bfloat16 -> (..., N)
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from jax_marlin import sharding
from jax_marlin.ops import marlin_matmul
from jax_marlin.quantize import dequantize, pack, quantize, unpack
from jax_marlin.quantized_weight import QuantizedWeight

try:  # pyproject.toml holds the version
    __version__ = _version("jax_marlin")
except _PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "QuantizedWeight",
    "backends",
    "dequantize",
    "marlin_matmul",
    "pack",
    "quantize",
    "sharding",
    "unpack",
]


def backends() -> frozenset:
    """Platforms this build has a kernel for: a subset of {"cpu", "cuda"}."""
    from jax_marlin import _ffi  # the compiled extension; imported on first use

    return _ffi.BACKENDS
