"""jax_marlin: 4-bit Marlin-format quantized matmuls for JAX (CPU and CUDA).

    qw = quantize(w, group_size=128)   # or pack(codes, scales), QuantizedWeight(...)
    y = marlin_matmul(x, qw)           # x (..., K) float16/bfloat16 -> (..., N)

Flax (imported on first use, so that ``import jax_marlin`` stays light):

    QuantDense                         # NNX layer (jax_marlin.nnx); Linen: jax_marlin.linen.QuantDense
    quantize_params(params, method="rtn" | "gptq", calib=...)   # Dense kernels -> QuantDense params
    convert                            # HF GPTQ checkpoints -> Marlin; orbax save/restore

Sharded use (pjit / shard_map): jax_marlin.sharding.
"""

import importlib as _importlib

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from jax_marlin import sharding
from jax_marlin.ops import marlin_matmul
from jax_marlin.quantize import dequantize, pack, quantize, unpack
from jax_marlin.quantized_weight import QuantizedWeight
from jax_marlin.sparse_quantize import pack_sparse, quantize_sparse, unpack_sparse
from jax_marlin.sparse_weight import SparseQuantizedWeight

try:  # pyproject.toml holds the version
    __version__ = _version("jax_marlin")
except _PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# Public names that live in modules importing flax (or optional packages);
# resolved on first access (PEP 562).
_LAZY = {
    "QuantDense": ("jax_marlin.nnx", "QuantDense"),
    "quantize_params": ("jax_marlin.params", "quantize_params"),
    "convert": ("jax_marlin.convert", None),
    "gptq": ("jax_marlin.gptq", None),
    "linen": ("jax_marlin.linen", None),
    "nnx": ("jax_marlin.nnx", None),
}


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'jax_marlin' has no attribute {name!r}") from None
    mod = _importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "QuantDense",
    "QuantizedWeight",
    "SparseQuantizedWeight",
    "backends",
    "convert",
    "dequantize",
    "gptq",
    "linen",
    "marlin_matmul",
    "pack",
    "pack_sparse",
    "quantize",
    "quantize_params",
    "quantize_sparse",
    "sharding",
    "unpack",
    "unpack_sparse",
]


def backends() -> frozenset:
    """Platforms this build has a kernel for: a subset of {"cpu", "cuda"}."""
    from jax_marlin import _ffi  # the compiled extension; imported on first use

    return _ffi.BACKENDS
