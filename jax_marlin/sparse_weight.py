"""SparseQuantizedWeight: a 2:4 sparse 4-bit weight (Sparse-Marlin layout) as a JAX pytree."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jax_marlin import sparse_layout
from jax_marlin.quantized_weight import _is_array_like, _ScaledWeight, check_scales


@dataclasses.dataclass(frozen=True)
class SparseQuantizedWeight(_ScaledWeight):
    """A (K, N) weight, 2:4 sparse along K, in the Sparse-Marlin 4-bit layout.

    Attributes (docs/SPARSE_FORMAT.md, ``jax_marlin.sparse_layout``):
      values: int32 (K // 32, 2 * N): the two kept 4-bit codes of every chunk
        of 4 along K, eight a word, in mma.sp A-fragment order.
      meta: int32 (K // 32, N): their positions in the chunk, 2 bits each, in
        mma.sp metadata-register order.
      scales: float16 or bfloat16 (K // group_size, N), permuted (the dense
        grouped order, for every group size); one row means per-channel.

    Build one with ``jax_marlin.quantize_sparse`` / ``pack_sparse``, or wrap
    already-packed arrays (validated). Like QuantizedWeight it is a pytree
    (leaves values, meta, scales) whose shape facts follow from the leaves'
    shapes; leaves may share leading (stack) dimensions.
    """

    values: jax.Array
    meta: jax.Array
    scales: jax.Array

    def __post_init__(self):
        if all(_is_array_like(a) for a in (self.values, self.meta, self.scales)):
            _validate(self.values, self.meta, self.scales)

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape (K, N)."""
        return (self.meta.shape[-2] * sparse_layout.BAND, self.meta.shape[-1])


def _validate(values, meta, scales) -> None:
    for name, a in (("values", values), ("meta", meta)):
        if a.dtype != np.int32:
            raise TypeError(
                f"SparseQuantizedWeight.{name} must be int32, got {a.dtype}. Use "
                f"jax_marlin.pack_sparse(codes, scales) to build it from uint8 codes."
            )
        if len(a.shape) < 2:
            raise ValueError(
                f"SparseQuantizedWeight.{name} must be 2-D (with optional leading stack "
                f"dimensions), got shape {tuple(a.shape)}."
            )
    lead = tuple(meta.shape[:-2])
    if tuple(values.shape[:-2]) != lead or tuple(scales.shape[:-2]) != lead or len(scales.shape) < 2:
        raise ValueError(
            f"SparseQuantizedWeight.values {tuple(values.shape)}, .meta {tuple(meta.shape)} "
            f"and .scales {tuple(scales.shape)} must be 2-D or share their leading (stack) dimensions."
        )
    bands, N = meta.shape[-2:]
    if tuple(values.shape[-2:]) != (bands, 2 * N):
        raise ValueError(
            f"SparseQuantizedWeight: values must be (K // 32, 2 * N) = ({bands}, {2 * N}) for "
            f"meta of shape (K // 32, N) = ({bands}, {N}), got {tuple(values.shape[-2:])}."
        )
    check_scales(scales, bands * sparse_layout.BAND, N, "SparseQuantizedWeight.scales", stacked=True)


jax.tree_util.register_dataclass(
    SparseQuantizedWeight, data_fields=["values", "meta", "scales"], meta_fields=[]
)

try:
    from flax import serialization as _flax_serialization
except ImportError:  # flax is optional
    pass
else:
    _FIELDS = ("values", "meta", "scales")

    def _to_state_dict(w: SparseQuantizedWeight) -> dict:
        return {f: _flax_serialization.to_state_dict(getattr(w, f)) for f in _FIELDS}

    def _from_state_dict(w: SparseQuantizedWeight, state: dict) -> SparseQuantizedWeight:
        return SparseQuantizedWeight(**{
            f: _flax_serialization.from_state_dict(getattr(w, f), state[f], name=f) for f in _FIELDS
        })

    _flax_serialization.register_serialization_state(
        SparseQuantizedWeight, _to_state_dict, _from_state_dict
    )
