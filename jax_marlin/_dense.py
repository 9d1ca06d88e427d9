"""Pieces shared by the NNX and Linen QuantDense layers (no flax import here).

- ``dense_matmul``: marlin_matmul on the layer's arrays (its backward pass,
  through the dequantized weight, lives with it in ops.py).
- ``check_layer``: the constructor checks, with messages naming the layer's
  arguments rather than the kernel's (K, N).
- ``scales_axes``: the logical axis names of the scales, given the kernel's.
- ``leaf_names`` / ``weight_leaves`` / ``matmul``: the layer's weight
  parameters for dense ("packed", "scales") and 2:4 sparse ("values", "meta",
  "scales") weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import layout
from jax_marlin.ops import marlin_matmul
from jax_marlin.quantized_weight import FLOAT_DTYPES, QuantizedWeight
from jax_marlin.sparse_weight import SparseQuantizedWeight

SPARSITIES = (None, "2:4")


def dense_matmul(x, packed, scales):
    """``x @ W`` via the Marlin kernel (differentiable w.r.t. x and scales, reverse mode)."""
    return marlin_matmul(x, QuantizedWeight(packed=packed, scales=scales))


def float16_dtype(dtype, what: str):
    """dtype as np.dtype; raise unless float16/bfloat16 (the kernel's only dtypes)."""
    d = np.dtype(dtype)
    if d not in FLOAT_DTYPES:
        raise TypeError(
            f"QuantDense: {what} must be float16 or bfloat16 (the Marlin kernel "
            f"computes in 16-bit floats), got {d}; e.g. {what}=jnp.bfloat16."
        )
    return d


def check_layer(in_features: int, out_features: int, group_size) -> None:
    """Raise ValueError saying what to change unless the layer's shape is supported."""
    if group_size is not None and group_size not in layout.GROUP_SIZES:
        raise ValueError(
            f"QuantDense: group_size must be one of {layout.GROUP_SIZES} or None "
            f"(per-channel), got {group_size!r}."
        )
    K, N = in_features, out_features
    g = K if group_size is None else group_size
    try:
        layout.check_shape(K, N, g)
    except ValueError as e:
        raise ValueError(
            f"QuantDense(in_features={K}, features/out_features={N}, "
            f"group_size={group_size}): {e} Keep this layer as a plain Dense "
            f"(quantize_params leaves such layers unquantized)."
        ) from None


def check_input(x, in_features: int) -> None:
    if x.ndim < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"QuantDense: the input's last dimension must be in_features = "
            f"{in_features}, got input shape {tuple(x.shape)}."
        )


def scales_axes(kernel_axes, per_channel: bool):
    """Logical axis names of the scales for a kernel with names ``kernel_axes``.

    Scales are (K // g, N): the same two axes as the kernel. A per-channel
    weight has one row of scales, which cannot be split along K, so that axis
    is left unnamed (replicated).
    """
    if kernel_axes is None or len(kernel_axes) < 2:
        return kernel_axes
    kernel_axes = tuple(kernel_axes)
    if per_channel:
        return kernel_axes[:-2] + (None, kernel_axes[-1])
    return kernel_axes


def quantize_kernel(kernel, group_size, dtype) -> QuantizedWeight:
    """RTN-quantize a freshly initialized (K, N) kernel (layers' init)."""
    from jax_marlin.quantize import quantize

    return quantize(jnp.asarray(kernel, jnp.float32), group_size, dtype=dtype)


def check_sparsity(sparsity) -> None:
    if sparsity not in SPARSITIES:
        raise ValueError(
            f"QuantDense: sparsity must be None (dense) or \"2:4\" (2:4 sparse along the "
            f"input dimension), got {sparsity!r}."
        )


def leaf_names(sparsity) -> tuple[str, ...]:
    """Parameter names of the weight, in the order of its pytree leaves."""
    return ("values", "meta", "scales") if sparsity == "2:4" else ("packed", "scales")


def weight_leaves(qw) -> dict:
    """{parameter name: array} of a QuantizedWeight or SparseQuantizedWeight."""
    if isinstance(qw, SparseQuantizedWeight):
        return {"values": qw.values, "meta": qw.meta, "scales": qw.scales}
    return {"packed": qw.packed, "scales": qw.scales}


def leaf_shape(name: str, K: int, N: int, g: int) -> tuple[tuple[int, int], bool]:
    """(shape, is_int32) of parameter ``name`` for a (K, N) weight with group size g."""
    return {
        "packed": ((K // 16, 2 * N), True),
        "values": ((K // 32, 2 * N), True),
        "meta": ((K // 32, N), True),
        "scales": ((K // g, N), False),
    }[name]


def in_features_of(name: str, leaf) -> int:
    """K of the weight, read off its first parameter (packed or values)."""
    return leaf.shape[-2] * (16 if name == "packed" else 32)


def matmul(x, leaves: dict):
    """``x @ W`` for the layer's weight parameters (dense or sparse)."""
    if "values" in leaves:
        return marlin_matmul(x, SparseQuantizedWeight(**leaves))
    return marlin_matmul(x, QuantizedWeight(**leaves))


def quantize_sparse_kernel(kernel, group_size, dtype) -> SparseQuantizedWeight:
    from jax_marlin.sparse_quantize import quantize_sparse

    return quantize_sparse(jnp.asarray(kernel, jnp.float32), group_size, dtype=dtype)
