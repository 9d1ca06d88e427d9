"""QuantizedWeight: a 4-bit Marlin-packed weight as a JAX pytree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import layout

# 16-bit float types the kernel computes in (scales share the activations' dtype).
FLOAT_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def _is_array_like(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


class _ScaledWeight:
    """What every quantized weight type derives from its ``scales`` leaf (K // g, N)
    and its ``shape`` property: the group size, per-channel-ness, the dtype, and a
    copy with the scales in the other 16-bit dtype."""

    @property
    def group_size(self) -> int:
        """Rows of the weight sharing one scale; K for per-channel."""
        return self.shape[0] // self.scales.shape[-2]

    @property
    def is_per_channel(self) -> bool:
        return self.scales.shape[-2] == 1

    @property
    def dtype(self):
        """The scales' dtype: activations passed to marlin_matmul must match it."""
        return self.scales.dtype

    def astype(self, dtype):
        """Return a copy with scales converted to ``dtype`` (float16 or bfloat16).

        Use it to run with activations of the other 16-bit dtype. The codes are
        unchanged; scales are rounded to the new dtype (float16 -> bfloat16
        loses mantissa bits, bfloat16 -> float16 may overflow past 65504).
        """
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{type(self).__name__}.astype: dtype must be float16 or bfloat16, got {dtype}."
            )
        return dataclasses.replace(self, scales=jnp.asarray(self.scales).astype(dtype))


@dataclasses.dataclass(frozen=True)
class QuantizedWeight(_ScaledWeight):
    """A (K, N) weight in the Marlin 4-bit layout (FORMAT.md).

    Attributes:
      packed: int32 (K // 16, 2 * N), eight 4-bit codes per word.
      scales: float16 or bfloat16 (K // group_size, N), in the kernel's
        permuted order. A single row means per-channel (group_size == K).

    Build one with ``jax_marlin.pack`` / ``jax_marlin.quantize``, or wrap
    already-packed arrays (e.g. from a checkpoint) with
    ``QuantizedWeight(packed=..., scales=...)``, which validates them.

    It is a pytree whose leaves are ``packed`` and ``scales``; everything else
    (shape, group size) follows from their shapes, so it passes through
    ``jax.jit``, ``jax.device_put`` and pytree-based checkpointing as is.

    A stack of same-shaped weights (e.g. one per layer, for ``jax.lax.scan``)
    is a QuantizedWeight whose leaves share extra leading dimensions;
    ``shape`` and ``group_size`` then describe one weight of the stack, and
    ``marlin_matmul`` takes one weight at a time (scan or ``jax.lax.map``).
    """

    packed: jax.Array
    scales: jax.Array

    def __post_init__(self):
        # Pytree machinery rebuilds this class with non-array leaves (None,
        # object() sentinels, in_axes specs); validate only real arrays/tracers.
        if _is_array_like(self.packed) and _is_array_like(self.scales):
            _validate(self.packed, self.scales)

    @property
    def shape(self) -> tuple[int, int]:
        """The dense weight's shape (K, N)."""
        return (self.packed.shape[-2] * 16, self.packed.shape[-1] // 2)


def _validate(packed, scales) -> None:
    if packed.dtype != np.int32:
        raise TypeError(
            f"QuantizedWeight.packed must be int32 (eight 4-bit codes per word), "
            f"got {packed.dtype}. Use jax_marlin.pack(codes, scales) to build it "
            f"from uint8 codes."
        )
    if len(packed.shape) < 2 or packed.shape[-1] % 2:
        raise ValueError(
            f"QuantizedWeight.packed must be (K // 16, 2 * N) (with optional leading "
            f"stack dimensions), got shape {tuple(packed.shape)}."
        )
    if tuple(packed.shape[:-2]) != tuple(scales.shape[:-2]) or len(scales.shape) < 2:
        raise ValueError(
            f"QuantizedWeight.packed {tuple(packed.shape)} and .scales "
            f"{tuple(scales.shape)} must both be 2-D, or share their leading (stack) "
            f"dimensions."
        )
    K, N = packed.shape[-2] * 16, packed.shape[-1] // 2
    check_scales(scales, K, N, "QuantizedWeight.scales", stacked=True)


def check_scales(scales, K: int, N: int, what: str, stacked: bool = False) -> None:
    """Check scales (dtype, shape) for a (K, N) weight; also checks (K, N, g) is supported.

    ``what`` names the argument in the messages; ``stacked`` allows leading
    dimensions (checked by the caller).
    """
    if scales.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must be float16 or bfloat16 (the activations' dtype), got "
            f"{scales.dtype}; cast them, e.g. scales.astype(jnp.float16)."
        )
    if len(scales.shape) != 2 and not (stacked and len(scales.shape) > 2):
        raise ValueError(
            f"{what} must be 2-D (K // group_size, N), got shape {tuple(scales.shape)}."
        )
    G = scales.shape[-2]
    if scales.shape[-1] != N:
        raise ValueError(
            f"{what} has {scales.shape[-1]} columns but the weight has N = {N}; "
            f"scales must be (K // group_size, {N})."
        )
    if G == 0 or K % G:
        raise ValueError(
            f"{what} has {G} rows, which does not divide K = {K}; scales must be "
            f"(K // group_size, N) (one row for per-channel)."
        )
    layout.check_shape(K, N, K // G)


jax.tree_util.register_dataclass(
    QuantizedWeight, data_fields=["packed", "scales"], meta_fields=[]
)


# flax.serialization (msgpack checkpoints) walks its own registry, not jax's;
# register there too when flax is installed, as flax.struct.dataclass does.
try:
    from flax import serialization as _flax_serialization
except ImportError:  # flax is optional
    pass
else:

    def _to_state_dict(qw: QuantizedWeight) -> dict:
        return {
            "packed": _flax_serialization.to_state_dict(qw.packed),
            "scales": _flax_serialization.to_state_dict(qw.scales),
        }

    def _from_state_dict(qw: QuantizedWeight, state: dict) -> QuantizedWeight:
        return QuantizedWeight(
            packed=_flax_serialization.from_state_dict(qw.packed, state["packed"], name="packed"),
            scales=_flax_serialization.from_state_dict(qw.scales, state["scales"], name="scales"),
        )

    _flax_serialization.register_serialization_state(
        QuantizedWeight, _to_state_dict, _from_state_dict
    )
