"""From dense weights and codes to SparseQuantizedWeight and back (docs/SPARSE_FORMAT.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import layout, sparse_layout
from jax_marlin.quantize import _quantize_arrays, check_codes, check_float_weight
from jax_marlin.sparse_weight import SparseQuantizedWeight


def _check_two_of_four(codes) -> None:
    """ValueError naming the first chunk of 4 along K with more than two non-zero codes."""
    try:
        counts = np.asarray(sparse_layout.nonzeros_per_chunk(codes))
    except jax.errors.ConcretizationTypeError:  # traced: values unknown until run
        return
    bad = np.argwhere(counts > sparse_layout.KEPT)
    if bad.size:
        q, n = (int(i) for i in bad[0])
        k0 = q * sparse_layout.CHUNK
        raise ValueError(
            f"pack_sparse: codes are not 2:4 sparse along K: rows {k0}..{k0 + 3} (group "
            f"{q} of 4 along K) of column {n} hold {int(counts[q, n])} non-zero codes "
            f"(codes != {sparse_layout.ZERO_CODE}); at most 2 of every 4 consecutive K "
            f"entries may be non-zero ({len(bad)} such groups in all). Prune first, e.g. "
            f"jax_marlin.quantize_sparse(w) or jax_marlin.sparse_layout.prune_mask(w)."
        )


def pack_sparse(codes, scales) -> SparseQuantizedWeight:
    """Pack 2:4 sparse 4-bit codes and natural-order scales into the Sparse-Marlin layout.

    Args:
      codes: integer array (K, N) of codes 0..15 (value = code - 8), with at
        most two codes other than 8 in every 4 consecutive rows of a column
        (checked when concrete). K and N must be multiples of 64.
      scales: float16 or bfloat16 (K // g, N), NOT permuted; one row means
        per-channel.
    """
    codes, scales = check_codes(codes, scales, "pack_sparse", "jax_marlin.quantize_sparse(w)")
    _check_two_of_four(codes)
    values, meta = sparse_layout.pack_codes(codes)
    return SparseQuantizedWeight(values=values, meta=meta, scales=sparse_layout.permute_scales(scales))


def unpack_sparse(sqw: SparseQuantizedWeight) -> tuple[jax.Array, jax.Array]:
    """Inverse of ``pack_sparse``: (codes uint8 (K, N), 8 where pruned; natural-order scales)."""
    return (sparse_layout.unpack_codes(sqw.values, sqw.meta),
            sparse_layout.unpermute_scales(sqw.scales))


def prune_2_4(w):
    """``w`` with all but the two largest |w| of every 4 consecutive K entries set to 0."""
    w = jnp.asarray(w)
    return jnp.where(sparse_layout.prune_mask(w), w, jnp.zeros_like(w))


def quantize_sparse(w, group_size: int | None = 128, *, dtype=None) -> SparseQuantizedWeight:
    """Magnitude 2:4 pruning along K, then symmetric RTN 4-bit quantization of what is kept.

    Keeps the two largest |w| of every 4 consecutive entries of a column
    (ties: the lower k), then quantizes the pruned weight exactly as
    ``jax_marlin.quantize`` does (``s = max|w| / 7`` over the kept entries of a
    group, rounded to ``dtype``; pruned entries get code 8, the value 0).
    Arguments as for ``quantize``.
    """
    w, g, dtype = check_float_weight(w, group_size, dtype, "quantize_sparse")
    sparse_layout.check_shape(*w.shape, g)
    codes, scales = _quantize_arrays(prune_2_4(w), g, dtype)
    values, meta = sparse_layout.pack_codes(codes)
    return SparseQuantizedWeight(values=values, meta=meta, scales=sparse_layout.permute_scales(scales))


@jax.jit
def dequantize_sparse(sqw: SparseQuantizedWeight) -> jax.Array:
    """The dense (K, N) weight the sparse kernel multiplies by: (code - 8) * s, zeros where pruned."""
    codes, scales = unpack_sparse(sqw)
    *lead, K, N = codes.shape
    G = scales.shape[-2]
    values = codes.astype(jnp.float32).reshape(*lead, G, K // G, N) - layout.CODE_OFFSET
    w = values * scales.astype(jnp.float32)[..., :, None, :]
    return w.reshape(*lead, K, N).astype(scales.dtype)
