"""Column orders of the fused projections ``qkv_proj`` and ``gate_up_proj``: the one place that knows them.

A decoder layer makes 7 projection calls unfused (q, k, v, o, gate, up,
down) and 4 fused, as serving engines do: one ``qkv_proj`` (D -> (H + 2 KV)
* head_dim) and one ``gate_up_proj`` (D -> 2 F). Fewer, wider matmuls: fewer
kernel launches per decode step, and the int4 kernel runs wide weights more
efficiently.

The column orders are chosen so that tensor parallelism (column-parallel
sharding over "model": each of ``tp`` devices holds one contiguous, equal
chunk of the output columns) stays correct without knowing ``tp`` when the
weights are made, loaded or saved:

- ``qkv_proj``: columns grouped per KV head j: [the G = H / KV query heads
  that share KV head j (G * head_dim columns), k head j, v head j]. A
  contiguous shard holds whole groups whenever tp divides KV, so each device
  computes attention for its own heads with no communication. The output
  reshapes to (..., KV, G + 2, head_dim) (``split_qkv``).
- ``gate_up_proj``: gate and up interleaved in chunks of C columns, [gate
  0:C, up 0:C, gate C:2C, up C:2C, ...], C = 128 if F % 128 == 0 else 64
  (``gate_up_chunk``). A contiguous shard holds matching gate and up columns
  whenever (F / tp) % C == 0, so SwiGLU needs no communication and its output
  is split over F exactly as the row-parallel down_proj wants it. The output
  reshapes to (..., F / C, 2, C) (``split_gate_up``).

Every chunk is a multiple of 64 columns when head_dim is, and the Marlin
format allows column slices and concatenations in multiples of 64 (FORMAT.md),
so packed int4 weights (e.g. from GPTQ checkpoints) fuse without requantizing.

The orders are given as *segments* ``(part, start, stop)``: fused columns are
the parts' columns ``start:stop`` concatenated in segment order. The same list
serves model (``split_*``), loader (``fuse``) and tests (``unfuse``).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jax_marlin import layout
from jax_marlin.quantized_weight import QuantizedWeight

__all__ = ["Segment", "QKV_PARTS", "GATE_UP_PARTS", "gate_up_chunk", "qkv_columns",
           "gate_up_columns", "fuse", "unfuse", "split_qkv", "split_gate_up"]

# Part names, as the unfused projections (and Hugging Face's modules) are
# named: part p is "{p}_proj".
QKV_PARTS = ("q", "k", "v")
GATE_UP_PARTS = ("gate", "up")


class Segment(NamedTuple):
    part: str  # which unfused projection the columns come from
    start: int  # its first column
    stop: int  # one past its last column


def gate_up_chunk(ffn_dim: int) -> int:
    """C, the width of the gate/up interleave: 128 if ``ffn_dim`` allows, else 64.

    128 keeps each chunk one 128-column group of the kernel's wider tiles;
    64 is the least the packed format can slice. It depends on ``ffn_dim``
    only (never on tp), so weights fused once serve any valid tp.
    """
    if ffn_dim % 64:
        raise ValueError(f"fused gate_up_proj: ffn_dim = {ffn_dim} must be a multiple of 64 "
                         f"(gate and up are interleaved in chunks of 64 or 128 columns); "
                         f"use fused_projections=False for this model.")
    return 128 if ffn_dim % 128 == 0 else 64


def qkv_columns(n_heads: int, n_kv_heads: int, head_dim: int) -> list[Segment]:
    """Segments of ``qkv_proj``: per KV head j, its G query heads, k head j, v head j."""
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}).")
    G, hd = n_heads // n_kv_heads, head_dim
    out = []
    for j in range(n_kv_heads):
        out += [Segment("q", j * G * hd, (j + 1) * G * hd),
                Segment("k", j * hd, (j + 1) * hd), Segment("v", j * hd, (j + 1) * hd)]
    return out


def gate_up_columns(ffn_dim: int) -> list[Segment]:
    """Segments of ``gate_up_proj``: gate and up alternating in chunks of ``gate_up_chunk``."""
    C = gate_up_chunk(ffn_dim)
    return [Segment(p, i, i + C) for i in range(0, ffn_dim, C) for p in GATE_UP_PARTS]


# --- Weights -----------------------------------------------------------------------


def _widths(segments: Sequence[Segment]) -> dict[str, int]:
    widths: dict[str, int] = {}
    for s in segments:
        widths[s.part] = max(widths.get(s.part, 0), s.stop)
    return widths


def _concat_columns(parts: Mapping, segments: Sequence[Segment]):
    xp = np if all(isinstance(p, np.ndarray) for p in parts.values()) else jnp
    return xp.concatenate([parts[s.part][..., s.start:s.stop] for s in segments], axis=-1)


def fuse(parts: Mapping, segments: Sequence[Segment]):
    """The fused weight from ``parts`` ({part: weight}), columns in ``segments`` order.

    Weights are (K, N_part) arrays (numpy or JAX, the ``x @ W`` layout) or
    ``QuantizedWeight``s of one group size. Quantized parts are fused in the
    packed format: by column slices when every segment is a multiple of 64
    columns (exact, no repacking), else by unpacking the 4-bit codes, moving
    columns and packing again (exact too, slower).
    """
    widths = _widths(segments)
    for p, w in widths.items():
        if p not in parts:
            raise KeyError(f"fuse: part {p!r} is missing (have {sorted(parts)}).")
        if parts[p].shape[-1] != w:
            raise ValueError(f"fuse: part {p!r} has {parts[p].shape[-1]} columns, the column "
                             f"order expects {w}.")
    if not all(isinstance(p, QuantizedWeight) for p in parts.values()):
        return _concat_columns(parts, segments)
    if all(s.start % layout.TILE == 0 and s.stop % layout.TILE == 0 for s in segments):
        # packed is (K/16, 2N): column n's codes are words 2n, 2n+1 of every 64-column run.
        packed = {p: qw.packed for p, qw in parts.items()}
        scales = {p: qw.scales for p, qw in parts.items()}
        return QuantizedWeight(
            packed=jnp.concatenate([packed[s.part][:, 2 * s.start:2 * s.stop] for s in segments], -1),
            scales=_concat_columns(scales, segments))
    codes = {p: layout.unpack_codes(qw.packed) for p, qw in parts.items()}
    scales = {p: layout.unpermute_scales(qw.scales) for p, qw in parts.items()}
    return QuantizedWeight(packed=layout.pack_codes(_concat_columns(codes, segments)),
                           scales=layout.permute_scales(_concat_columns(scales, segments)))


def unfuse(fused, segments: Sequence[Segment]) -> dict:
    """Inverse of ``fuse`` for arrays: {part: (K, N_part)} from the fused (K, N) array."""
    spans: dict[str, list] = {}  # part -> [(its start column, fused start, fused stop)]
    col = 0
    for s in segments:
        spans.setdefault(s.part, []).append((s.start, col, col + s.stop - s.start))
        col += s.stop - s.start
    if fused.shape[-1] != col:
        raise ValueError(f"unfuse: {fused.shape[-1]} columns, the column order has {col}.")
    xp = np if isinstance(fused, np.ndarray) else jnp
    return {p: xp.concatenate([fused[..., a:b] for _, a, b in sorted(sp)], axis=-1)
            for p, sp in spans.items()}


# --- Outputs -----------------------------------------------------------------------


def split_qkv(y, n_heads: int, n_kv_heads: int, head_dim: int):
    """q (..., H, hd), k (..., KV, hd), v (..., KV, hd) from ``qkv_proj``'s output (..., (H + 2 KV) hd).

    Query head h = j * G + g uses KV head j = h // G, as in Hugging Face's
    grouped-query attention.
    """
    G = n_heads // n_kv_heads
    lead = y.shape[:-1]
    y = y.reshape(*lead, n_kv_heads, G + 2, head_dim)
    q = y[..., :G, :].reshape(*lead, n_heads, head_dim)
    return q, y[..., G, :], y[..., G + 1, :]


def split_gate_up(y, ffn_dim: int):
    """gate (..., F/C, C), up (..., F/C, C) from ``gate_up_proj``'s output (..., 2 F).

    Left in chunks: SwiGLU is elementwise, so the caller reshapes its product
    to (..., F) once.
    """
    C = gate_up_chunk(ffn_dim)
    y = y.reshape(*y.shape[:-1], ffn_dim // C, 2, C)
    return y[..., 0, :], y[..., 1, :]
