"""The 2:4 sparse 4-bit layout (Sparse-Marlin): the one place that knows it.

See docs/SPARSE_FORMAT.md. The layout is made for ``mma.sp.sync.aligned.m16n8k32``
with the sparse operand A = W^T (16 output columns n x 32 inputs k per mma,
sparsity along k) and f16/bf16 B = x^T, f32 accumulation:

- A weight (K, N) is cut into *bands* of 32 input rows (one mma's k) and
  *runs* of 64 output columns (four mma n-blocks of 16).
- In each (n, 4-row chunk q of k) at most two codes differ from 8 (value 0).
  The two kept codes (``e`` = 0, 1 in increasing k) are stored as nibbles in
  ``values`` and their positions 0..3 inside the chunk as 2-bit fields in
  ``meta`` (always two distinct positions, increasing: what the PTX ISA's
  metadata wants, ``::ordered_metadata`` included).
- ``values``: int32 (K // 32, 2 * N). A run's 128 words are ordered
  ``4 * lane + nb``: lane ``l = 4 g + t`` (``g = l // 4``, ``t = l % 4``) of a
  warp reads its four words (n-blocks nb = 0..3) with one 16-byte load. The
  word holds that lane's A fragment of mma nb: elements
  e0, e1 = (n-row g,     k-chunk t,     kept 0, 1)  -> register a0
  e2, e3 = (n-row g + 8, k-chunk t)                 -> a1
  e4, e5 = (n-row g,     k-chunk t + 4)             -> a2
  e6, e7 = (n-row g + 8, k-chunk t + 4)             -> a3
  in nibbles in the order (e0, e2, e4, e6, e1, e3, e5, e7), the dense
  format's interleave: nibbles j and j + 4 form one half2, so the dense
  kernel's ``Dtype<T>::dequant(w, frag0, frag1)`` yields the A registers
  {a0, a1, a2, a3} = {frag0[0], frag0[1], frag1[0], frag1[1]} unchanged.
- ``meta``: int32 (K // 32, N). A run's 64 words are ordered ``2 * lane + j``
  (one 8-byte load a lane per band). Word j of lane (g, t) is the metadata
  register of the mmas for n-blocks 2j (sparsity selector 0, read from lanes
  t = 0, 1) and 2j + 1 (selector 1, lanes t = 2, 3): it describes n-block
  ``nb = 2 j + t // 2``, k-chunks ``4 h .. 4 h + 3`` with ``h = t % 2``;
  bits [15:0] for n-row g, [31:16] for n-row g + 8, chunk ``4 h + c`` in bits
  4c .. 4c + 3 (low two bits: position of kept 0, high two: of kept 1).
- ``scales``: (K // g, N), in the dense *grouped* order for every group size,
  per-channel included: lane g then reads the eight scales of its n-rows
  g + 8 j (j = 2 nb for row g, 2 nb + 1 for row g + 8) as one 16-byte load.

Column slices of whole runs (64 columns) and row slices of whole bands
(32 rows, and whole groups) of ``values``, ``meta`` and ``scales`` are valid
sparse weights: nothing crosses a run or a band.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_marlin import layout

# Tiles: the kernel's K and N tile is the dense one (64); a band is one
# mma.sp's k; a run is four mma n-blocks.
TILE = layout.TILE
BAND = 32
RUN = 64
CHUNK = 4  # 2:4 sparsity: at most two kept values in each chunk of 4 along K
KEPT = 2
GROUP_SIZES = layout.GROUP_SIZES
ZERO_CODE = layout.CODE_OFFSET  # code 8 is the value 0

# Bytes a (K, N) weight takes, for the roofline (docs/SPARSE_FORMAT.md).
def nbytes(K: int, N: int, group_size: int | None, scale_bytes: int = 2) -> dict[str, int]:
    g = K if group_size is None else group_size
    values = K * N // 2 // 2  # K/2 kept codes a column, 4 bits each
    meta = K * N // 4 * KEPT * 2 // 8  # two 2-bit positions a chunk of 4
    scales = K // g * N * scale_bytes
    return {"values": values, "meta": meta, "scales": scales, "total": values + meta + scales}


def check_shape(K: int, N: int, g: int) -> None:
    """ValueError unless (K, N, g) is supported: the dense limits (K, N multiples of 64)."""
    layout.check_shape(K, N, g)


# --- Index tables --------------------------------------------------------------
# Natural order of a run's kept entries: index (q * 64 + n) * 2 + e, with q the
# 4-row chunk of the band (0..7), n the column in the run (0..63), e = kept 0/1.

_INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j holds fragment element _INTERLEAVE[j]


def _natural(q: int, n: int, e: int) -> int:
    return (q * RUN + n) * KEPT + e


def _value_perm() -> np.ndarray:
    """VALUE_PERM[p] = natural index of the kept code in nibble p (word p // 8) of a run."""
    perm = []
    for lane in range(32):
        g, t = divmod(lane, 4)
        for nb in range(4):
            elements = []
            for f in range(8):  # fragment element f: register f // 2, half f % 2
                row = g + 8 * ((f // 2) % 2)
                q = t + 4 * (f // 4)
                elements.append(_natural(q, 16 * nb + row, f % 2))
            perm.extend(elements[i] for i in _INTERLEAVE)
    return np.asarray(perm)


def _meta_perm() -> np.ndarray:
    """META_PERM[p] = natural index of the position in 2-bit field p (word p // 16) of a run."""
    perm = []
    for lane in range(32):
        g, t = divmod(lane, 4)
        for j in range(2):
            nb, h = 2 * j + t // 2, t % 2
            for f in range(16):
                row = g + 8 * (f // 8)
                q = 4 * h + (f % 8) // 2
                perm.append(_natural(q, 16 * nb + row, f % 2))
    return np.asarray(perm)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int32)
    a.setflags(write=False)
    return a


VALUE_PERM = _frozen(_value_perm())
META_PERM = _frozen(_meta_perm())
# Scales: the dense grouped order (layout.SCALE_RUN, runs of 64), for every group size.

_RUN_ENTRIES = BAND // CHUNK * RUN * KEPT  # 1024 kept entries a run
assert sorted(VALUE_PERM.tolist()) == list(range(_RUN_ENTRIES))
assert sorted(META_PERM.tolist()) == list(range(_RUN_ENTRIES))
# Both move index bits only, so they run as transposes (see layout.RunTranspose).
VALUE_RUN = layout.RunTranspose.of(VALUE_PERM)
META_RUN = layout.RunTranspose.of(META_PERM)


# --- Kept entries <-> runs ---------------------------------------------------------


def _to_runs(a):
    """(..., K // 4, N, 2) -> (..., K // 32, N // 64, 1024) in natural run order."""
    *lead, Q, N, _ = a.shape
    a = a.reshape(*lead, Q // 8, 8, N // RUN, RUN, KEPT)
    a = jnp.moveaxis(a, -4, -3)  # (..., bands, runs, q, n, e)
    return a.reshape(*lead, Q // 8, N // RUN, _RUN_ENTRIES)


def _from_runs(a, N: int):
    """Inverse of _to_runs."""
    *lead, bands, runs, _ = a.shape
    a = a.reshape(*lead, bands, runs, 8, RUN, KEPT)
    a = jnp.moveaxis(a, -3, -4)
    return a.reshape(*lead, bands * 8, N, KEPT)


def _pack_fields(runs, perm: layout.RunTranspose, bits: int):
    """Permute each run and pack 32 // bits fields a word: (..., bands, runs, 1024) -> int32 (..., bands, W)."""
    per_word = 32 // bits
    *lead, bands, nruns, _ = runs.shape
    v = layout._permute_runs(runs.astype(jnp.uint32) & ((1 << bits) - 1), perm)
    v = v.reshape(*lead, bands, nruns * _RUN_ENTRIES // per_word, per_word)
    v = v << jnp.asarray(np.arange(per_word, dtype=np.uint32) * bits)
    word = v[..., 0]
    for j in range(1, per_word):
        word = word | v[..., j]
    return jax.lax.bitcast_convert_type(word, jnp.int32)


def _unpack_fields(words, inv: layout.RunTranspose, bits: int):
    """Inverse of _pack_fields: int32 (..., bands, W) -> (..., bands, runs, 1024) uint32."""
    per_word = 32 // bits
    *lead, bands, W = words.shape
    w = jax.lax.bitcast_convert_type(words, jnp.uint32)
    v = (w[..., None] >> jnp.asarray(np.arange(per_word, dtype=np.uint32) * bits)) & ((1 << bits) - 1)
    v = v.reshape(*lead, bands, W * per_word // _RUN_ENTRIES, _RUN_ENTRIES)
    return layout._permute_runs(v, inv)


# --- Codes <-> (values, meta) ----------------------------------------------------------


def kept_positions(nonzero):
    """Positions of the two kept entries of every chunk: (..., K // 4, 4, N) bool -> (..., K // 4, 2, N).

    The non-zero entries (at most two) and, when a chunk has fewer, the
    lowest zero positions; increasing, so always two distinct positions.
    """
    i = jnp.arange(CHUNK, dtype=jnp.int32)[:, None]
    key = jnp.where(nonzero, i, i + CHUNK)
    pos = jnp.argsort(key, axis=-2)[..., :KEPT, :]
    return jnp.sort(pos, axis=-2).astype(jnp.int32)


@jax.jit
def pack_codes(codes) -> tuple[jax.Array, jax.Array]:
    """2:4 sparse codes (..., K, N) (code 8 = value 0) -> (values (..., K//32, 2N), meta (..., K//32, N)).

    Chunks with more than two non-zero codes are the caller's to reject
    (``count_nonzero_chunks``); here only the first two would be kept.
    """
    codes = jnp.asarray(codes)
    *lead, K, N = codes.shape
    c = codes.astype(jnp.uint32).reshape(*lead, K // CHUNK, CHUNK, N)
    pos = kept_positions(c != ZERO_CODE)
    kept = jnp.take_along_axis(c, pos, axis=-2)  # (..., K//4, 2, N)
    kept = jnp.swapaxes(kept, -1, -2)  # (..., K//4, N, 2)
    pos = jnp.swapaxes(pos, -1, -2)
    values = _pack_fields(_to_runs(kept), VALUE_RUN, 4)
    meta = _pack_fields(_to_runs(pos), META_RUN, 2)
    return values, meta


@jax.jit
def unpack_codes(values, meta) -> jax.Array:
    """Inverse of pack_codes: -> uint8 codes (..., K, N), 8 at the pruned positions."""
    values, meta = jnp.asarray(values), jnp.asarray(meta)
    *lead, bands, N = meta.shape
    kept = _from_runs(_unpack_fields(values, VALUE_RUN.inverse(), 4), N)  # (..., K//4, N, 2)
    pos = _from_runs(_unpack_fields(meta, META_RUN.inverse(), 2), N)
    i = jnp.arange(CHUNK, dtype=jnp.uint32)
    # Chunk entry i: kept 0 if it sits at i, else kept 1 if it does, else 0.
    out = jnp.where(pos[..., None, 0] == i, kept[..., None, 0],
                    jnp.where(pos[..., None, 1] == i, kept[..., None, 1], ZERO_CODE))
    out = jnp.moveaxis(out, -1, -2)  # (..., K//4, 4, N)
    return out.reshape(*lead, bands * BAND, N).astype(jnp.uint8)


def nonzeros_per_chunk(codes) -> jax.Array:
    """(..., K, N) codes -> (..., K // 4, N): how many codes of each chunk of 4 along K are not 8."""
    codes = jnp.asarray(codes)
    *lead, K, N = codes.shape
    return jnp.sum(codes.reshape(*lead, K // CHUNK, CHUNK, N) != ZERO_CODE, axis=-2)


def prune_mask(w) -> jax.Array:
    """Magnitude 2:4 mask of a (..., K, N) weight: the two largest |w| of each chunk of 4 along K.

    Ties go to the lower k (a stable sort), so the mask has exactly two
    entries a chunk.
    """
    w = jnp.asarray(w)
    *lead, K, N = w.shape
    a = jnp.abs(w.astype(jnp.float32)).reshape(*lead, K // CHUNK, CHUNK, N)
    order = jnp.argsort(-a, axis=-2, stable=True)
    rank = jnp.argsort(order, axis=-2, stable=True)
    return (rank < KEPT).reshape(*lead, K, N)


# --- Scales ----------------------------------------------------------------------------


@jax.jit
def permute_scales(scales) -> jax.Array:
    """Natural-order scales (..., K // g, N) -> the sparse kernel's order (grouped order for all g)."""
    return layout._permute_runs(jnp.asarray(scales), layout.SCALE_RUN)


@jax.jit
def unpermute_scales(scales) -> jax.Array:
    """Inverse of permute_scales."""
    return layout._permute_runs(jnp.asarray(scales), layout.SCALE_RUN.inverse())
