"""The Marlin 4-bit weight layout: the one place that knows it (see FORMAT.md).

Everything about how codes and scales are arranged in memory lives here:
the 1024-entry weight permutation, the two scale permutations, the nibble
packing, and the shape limits the kernel needs. Other modules import these.

The permutations are numpy constants computed once at import. The array
functions use jax.numpy only and are jitted (one compiled program per shape
instead of a dispatch per op), so they accept numpy or JAX arrays, nest under
``jax.jit``/``jax.vmap``, and return JAX arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# --- Supported shapes -------------------------------------------------------

# The kernel works on 64-wide tiles of K and N (FORMAT.md itself needs only
# K % 16 and N % 64; the kernel asks for more, so that is the limit we check).
TILE = 64
# Group sizes with a grouped scale layout; per-channel (g == K) is also allowed.
GROUP_SIZES = (32, 64, 128)

# Codes are unsigned 4-bit values; value = code - 8.
CODE_OFFSET = 8
CODE_MAX = 15


def check_shape(K: int, N: int, g: int) -> None:
    """Raise ValueError, saying what to change, unless (K, N, g) is supported.

    ``g`` is the group size: one of GROUP_SIZES, or ``K`` for per-channel.
    """
    if K <= 0 or N <= 0:
        raise ValueError(f"weight shape (K, N) = ({K}, {N}) must be positive.")
    if K % TILE:
        raise ValueError(
            f"K = {K} is not a multiple of {TILE}; the Marlin kernel tiles K by "
            f"{TILE}. Pad the weight's input dimension (and x's last axis) with "
            f"zeros to {-(-K // TILE) * TILE}."
        )
    if N % TILE:
        raise ValueError(
            f"N = {N} is not a multiple of {TILE}; the Marlin kernel tiles N by "
            f"{TILE}. Pad the weight's output dimension with zeros to "
            f"{-(-N // TILE) * TILE} and slice the result."
        )
    if g != K and g not in GROUP_SIZES:
        raise ValueError(
            f"group size {g} is not supported; use one of {GROUP_SIZES} or "
            f"per-channel (a single row of scales, group size = K = {K})."
        )
    if K % g:
        raise ValueError(
            f"group size {g} does not divide K = {K}; use a group size from "
            f"{GROUP_SIZES} that divides K, or per-channel (group size K)."
        )


# --- Permutations (FORMAT.md recipe) -----------------------------------------


def _weight_perm() -> np.ndarray:
    """P with out[i] = in[P[i]] inside each run of 1024 tiled codes.

    Lane t of a warp holds, for one m16n8k16 B fragment, rows 2(t%4), 2(t%4)+1,
    2(t%4+4), 2(t%4+4)+1 of column t//4, for two 8-column blocks; the four
    16x16 tiles of a 16x64 stripe follow 256 apart.
    """
    perm = []
    for t in range(32):
        c = t // 4
        lane = [
            16 * r + c + 8 * block
            for block in (0, 1)
            for r in (2 * (t % 4), 2 * (t % 4) + 1, 2 * (t % 4 + 4), 2 * (t % 4 + 4) + 1)
        ]
        for j in range(4):
            perm.extend(i + 256 * j for i in lane)
    # Interleave so one lop3 on a 32-bit word yields two adjacent halves.
    interleave = np.array([0, 2, 4, 6, 1, 3, 5, 7])
    return np.asarray(perm).reshape(-1, 8)[:, interleave].reshape(-1)


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def _frozen(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int32)
    a.setflags(write=False)
    return a


class RunTranspose(NamedTuple):
    """A permutation of every run of ``prod(shape)`` consecutive values (row-major)
    that is a transpose: ``out = run.reshape(shape).transpose(axes).ravel()``.

    All of the layout's permutations have this form. Applied as a reshape and
    a transpose, XLA moves the data with a transpose kernel that fuses with
    the nibble arithmetic around it; the same permutation as a gather
    (``jnp.take`` with the index array) is far slower on large weights, which
    the dequantize + dot path of large-M calls and on-device packing both hit.
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def indices(self) -> np.ndarray:
        """P with out[i] = in[P[i]] inside each run."""
        return _frozen(np.arange(self.size).reshape(self.shape).transpose(self.axes).reshape(-1))

    def inverse(self) -> "RunTranspose":
        return RunTranspose(tuple(self.shape[a] for a in self.axes), tuple(int(a) for a in np.argsort(self.axes)))

    @classmethod
    def of(cls, perm: np.ndarray) -> "RunTranspose":
        """The transpose equal to an index array P (out[i] = in[P[i]]) that moves
        the bits of the index (a power-of-two run), with adjacent axes merged;
        ValueError if P is not such a permutation."""
        bits = perm.size.bit_length() - 1
        images = [int(perm[1 << b]) for b in range(bits)] if perm.size == 1 << bits else []
        if sorted(images) != [1 << b for b in range(bits)]:
            raise ValueError("not a permutation of index bits")
        # Box axis a holds index bit bits - 1 - a (row-major), in and out.
        axes = [bits - 1 - (images[bits - 1 - o].bit_length() - 1) for o in range(bits)]
        groups = []  # runs of output axes that stay adjacent and in order in the input
        for a in axes:
            if groups and groups[-1][-1] + 1 == a:
                groups[-1].append(a)
            else:
                groups.append([a])
        order = sorted(range(len(groups)), key=lambda g: groups[g][0])  # input order of the groups
        run = cls(tuple(2 ** len(groups[g]) for g in order), tuple(order.index(g) for g in range(len(groups))))
        if not np.array_equal(run.indices(), perm):
            raise ValueError("not a permutation of index bits")
        return run


WEIGHT_PERM = _frozen(_weight_perm())
WEIGHT_PERM_INV = _frozen(_inverse(WEIGHT_PERM))
# Grouped scales: runs of 64, out[a] = in[perm[a]].
SCALE_PERM = _frozen(np.array([i + 8 * j for i in range(8) for j in range(8)]))
SCALE_PERM_INV = _frozen(_inverse(SCALE_PERM))
# Per-channel scales: runs of 32.
SCALE_PERM_CHANNEL = _frozen(
    np.array([2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)])
)
SCALE_PERM_CHANNEL_INV = _frozen(_inverse(SCALE_PERM_CHANNEL))
# The same permutations as the transposes the array functions apply
# (RunTranspose.of checks that each one equals its index array).
WEIGHT_RUN = RunTranspose.of(WEIGHT_PERM)
SCALE_RUN = RunTranspose.of(SCALE_PERM)
SCALE_RUN_CHANNEL = RunTranspose.of(SCALE_PERM_CHANNEL)


def _permute_runs(a: jax.Array, perm: RunTranspose) -> jax.Array:
    """Apply ``perm`` inside every run of ``perm.size`` values (row-major)."""
    runs = a.reshape(-1, *perm.shape)
    return jnp.transpose(runs, (0, *(1 + ax for ax in perm.axes))).reshape(a.shape)


# --- Codes <-> packed int32 ---------------------------------------------------

_TILE16 = 16  # mma fragment tile; the packed layout is made of 16x16 tiles.
_NIBBLE_SHIFTS = np.arange(8, dtype=np.uint32) * 4  # value j in bits 4j..4j+3


@jax.jit
def pack_codes(codes) -> jax.Array:
    """uint4 codes (..., K, N), values 0..15, -> packed int32 (..., K // 16, 2 * N).

    Values are masked to 4 bits (range checking is the caller's job: it needs
    concrete values, and a value > 15 must not spill into its neighbour).
    Leading dimensions (a stack of weights) are carried along.
    """
    codes = jnp.asarray(codes)
    *lead, K, N = codes.shape
    t = _TILE16
    v = (codes.astype(jnp.uint32) & 0xF).reshape(*lead, K // t, t, N // t, t)
    v = jnp.swapaxes(v, -3, -2).reshape(*lead, K // t, N * t)
    v = _permute_runs(v, WEIGHT_RUN)
    v = v.reshape(*lead, K // t, 2 * N, 8) << jnp.asarray(_NIBBLE_SHIFTS)
    word = v[..., 0]
    for j in range(1, 8):
        word = word | v[..., j]
    return jax.lax.bitcast_convert_type(word, jnp.int32)


@jax.jit
def unpack_codes(packed) -> jax.Array:
    """Inverse of pack_codes: int32 (..., K // 16, 2 * N) -> uint8 codes (..., K, N)."""
    packed = jnp.asarray(packed)
    *lead, rows, cols = packed.shape
    t = _TILE16
    K, N = rows * t, cols // 2
    word = jax.lax.bitcast_convert_type(packed, jnp.uint32)
    v = (word[..., None] >> jnp.asarray(_NIBBLE_SHIFTS)) & 0xF
    v = _permute_runs(v.reshape(*lead, rows, N * t), WEIGHT_RUN.inverse())
    v = jnp.swapaxes(v.reshape(*lead, rows, N // t, t, t), -3, -2)
    return v.reshape(*lead, K, N).astype(jnp.uint8)


# --- Scales -------------------------------------------------------------------


def _scale_perm(num_groups: int, inverse: bool) -> RunTranspose:
    # One row of scales means per-channel, which has its own permutation.
    run = SCALE_RUN_CHANNEL if num_groups == 1 else SCALE_RUN
    return run.inverse() if inverse else run


@jax.jit
def permute_scales(scales) -> jax.Array:
    """Natural-order scales (..., K // g, N) -> the kernel's order (same shape, dtype)."""
    scales = jnp.asarray(scales)
    return _permute_runs(scales, _scale_perm(scales.shape[-2], inverse=False))


@jax.jit
def unpermute_scales(scales) -> jax.Array:
    """Inverse of permute_scales."""
    scales = jnp.asarray(scales)
    return _permute_runs(scales, _scale_perm(scales.shape[-2], inverse=True))


# --- Row shards holding one group ----------------------------------------------

# A row (K) shard of a grouped weight that holds exactly one group has a single
# scale row, which the kernel reads as per-channel: it expects the per-channel
# order, not the grouped one. Within each run of 64 scales, undo the grouped
# order, then apply the per-channel order to each half of 32.
_CHANNEL_PERM_64 = np.concatenate([SCALE_PERM_CHANNEL, SCALE_PERM_CHANNEL + 32])
GROUPED_TO_CHANNEL = _frozen(SCALE_PERM_INV[_CHANNEL_PERM_64])
GROUPED_TO_CHANNEL_RUN = RunTranspose.of(GROUPED_TO_CHANNEL)


def grouped_scales_as_per_channel(scales) -> jax.Array:
    """One row of grouped-order scales (1, N) -> the per-channel order (1, N).

    For a shard of a grouped weight that holds a single group: the codes are
    unchanged, only the scales' order differs between the two kernel paths.
    """
    return _permute_runs(jnp.asarray(scales), GROUPED_TO_CHANNEL_RUN)
