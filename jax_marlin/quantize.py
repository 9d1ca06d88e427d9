"""From dense weights and codes to QuantizedWeight and back (FORMAT.md)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import layout
from jax_marlin.quantized_weight import FLOAT_DTYPES, QuantizedWeight, check_scales


def check_codes(codes, scales, who: str, quantizer: str):
    """(codes, scales) as arrays, after the checks every packer makes: integer codes
    (K, N) in 0..15 (their range only when concrete, not under ``jax.jit``) and
    scales (K // g, N) in a float dtype. ``who`` names the caller in messages;
    ``quantizer`` is the function to suggest for float weights."""
    codes = codes if hasattr(codes, "dtype") else np.asarray(codes)
    scales = scales if hasattr(scales, "dtype") else np.asarray(scales)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(
            f"{who}: codes must be an integer array (uint8 values 0..15), got "
            f"{codes.dtype}. To quantize float weights use {quantizer}."
        )
    if codes.ndim != 2:
        raise ValueError(f"{who}: codes must be 2-D (K, N), got shape {tuple(codes.shape)}.")
    K, N = codes.shape
    check_scales(scales, K, N, f"{who}: scales")
    try:
        lo, hi = int(codes.min()), int(codes.max())
    except jax.errors.ConcretizationTypeError:  # traced: values unknown until run
        lo, hi = 0, 0
    if lo < 0 or hi > layout.CODE_MAX:
        raise ValueError(
            f"{who}: codes must lie in 0..{layout.CODE_MAX} (value = code - "
            f"{layout.CODE_OFFSET}), got values in {lo}..{hi}. Signed int4 "
            f"values v in -8..7 are codes v + {layout.CODE_OFFSET}."
        )
    return codes, scales


def pack(codes, scales) -> QuantizedWeight:
    """Pack 4-bit codes and natural-order scales into the Marlin layout.

    Args:
      codes: integer array (K, N) of codes 0..15 (value = code - 8); uint8 is
        the natural dtype, any integer dtype is accepted. The range is checked
        when the codes are concrete (not under ``jax.jit``).
      scales: float16 or bfloat16 array (K // g, N), NOT permuted; one row
        means per-channel (g = K). The group size is g = K // scales.shape[0].

    Returns:
      A QuantizedWeight whose ``packed`` and ``scales`` are bit-exact with
      FORMAT.md.
    """
    codes, scales = check_codes(codes, scales, "pack", "jax_marlin.quantize(w)")
    return QuantizedWeight(
        packed=layout.pack_codes(codes), scales=layout.permute_scales(scales)
    )


def unpack(qw: QuantizedWeight) -> tuple[jax.Array, jax.Array]:
    """Exact inverse of ``pack``: returns (codes uint8 (K, N), natural-order scales).

    A stacked weight (leading dimensions) gives stacked codes and scales.
    """
    return layout.unpack_codes(qw.packed), layout.unpermute_scales(qw.scales)


def check_float_weight(w, group_size, dtype, who: str):
    """(w as an array, the group size g (K for per-channel), the scales' dtype) after
    the checks every quantizer makes; ``who`` names the caller in messages."""
    w = w if hasattr(w, "dtype") else np.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"{who}: w must be a float array, got {w.dtype}.")
    if w.ndim != 2:
        raise ValueError(f"{who}: w must be 2-D (K, N), got shape {tuple(w.shape)}.")
    if dtype is None:
        dtype = w.dtype if np.dtype(w.dtype) in FLOAT_DTYPES else jnp.float16
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{who}: dtype must be float16 or bfloat16, got {dtype}.")
    if group_size is not None and group_size not in layout.GROUP_SIZES:
        raise ValueError(
            f"{who}: group_size must be one of {layout.GROUP_SIZES} or None "
            f"(per-channel), got {group_size}."
        )
    return w, (w.shape[0] if group_size is None else group_size), dtype


def quantize(w, group_size: int | None = 128, *, dtype=None) -> QuantizedWeight:
    """Symmetric round-to-nearest 4-bit quantization of a dense (K, N) weight.

    Each group of ``group_size`` consecutive rows (per column) gets the scale
    ``s = max|w| / 7``, so the group maps onto values -7..7;
    ``code = clip(round(w / s) + 8, 0, 15)`` as in FORMAT.md. The scale is
    rounded to the output dtype before the codes are computed, so
    ``|w - dequantize(qw)| <= s / 2`` (up to that rounding) elementwise.
    An all-zero group gets s = 1 (its codes are all 8) instead of a NaN.

    Args:
      w: float array (K, N) (inputs x outputs, the ``x @ w`` convention).
      group_size: 32, 64, 128, or None for per-channel (one scale per column).
      dtype: dtype of the scales (and so of the activations the weight will
        be used with): float16 or bfloat16. Defaults to w's dtype when that is
        float16/bfloat16, else float16.
    """
    w, g, dtype = check_float_weight(w, group_size, dtype, "quantize")
    layout.check_shape(*w.shape, g)

    codes, scales = _quantize_arrays(w, g, dtype)
    return QuantizedWeight(packed=layout.pack_codes(codes), scales=layout.permute_scales(scales))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize_arrays(w, g: int, dtype) -> tuple[jax.Array, jax.Array]:
    """RTN codes (K, N) uint8 and natural-order scales (K // g, N) in dtype."""
    K, N = w.shape
    wf = w.astype(jnp.float32).reshape(K // g, g, N)
    amax = jnp.max(jnp.abs(wf), axis=1)
    max_value = layout.CODE_MAX - layout.CODE_OFFSET  # 7
    # Clamp so that every value (code - 8) * s, down to -8 s, stays finite in
    # dtype: a weight beyond the range saturates instead of becoming inf.
    s_max = float(jnp.finfo(dtype).max) / layout.CODE_OFFSET
    s = jnp.minimum(amax / max_value, s_max).astype(dtype)
    s = jnp.where(s == 0, jnp.ones_like(s), s)  # all-zero (or underflowing) group
    # The codes must be computed with the stored (rounded) scale. XLA allows
    # excess precision and may drop a convert-to-dtype-and-back pair; the
    # barrier keeps the rounding.
    s_rounded = jax.lax.optimization_barrier(s).astype(jnp.float32)
    q = jnp.round(wf / s_rounded[:, None, :]) + layout.CODE_OFFSET
    codes = jnp.clip(q, 0, layout.CODE_MAX).astype(jnp.uint8).reshape(K, N)
    return codes, s


@jax.jit
def dequantize(qw: QuantizedWeight) -> jax.Array:
    """The dense weight the kernel multiplies by: (code - 8) * s, shape (K, N), scales' dtype.

    A stacked weight (leading dimensions) gives a stacked (..., K, N) result.
    A SparseQuantizedWeight gives its dense weight (zeros where pruned).
    """
    from jax_marlin.sparse_weight import SparseQuantizedWeight  # imports this module

    if isinstance(qw, SparseQuantizedWeight):
        from jax_marlin.sparse_quantize import dequantize_sparse

        return dequantize_sparse(qw)
    codes, scales = unpack(qw)
    *lead, K, N = codes.shape
    G = scales.shape[-2]
    values = codes.astype(jnp.float32).reshape(*lead, G, K // G, N) - layout.CODE_OFFSET
    # (code - 8) * s is exact in float32; one rounding to the 16-bit dtype.
    w = values * scales.astype(jnp.float32)[..., :, None, :]
    return w.reshape(*lead, K, N).astype(scales.dtype)
