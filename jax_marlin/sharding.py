"""Sharded use of marlin_matmul: weight shardings, shard_map helpers, logical axes.

Under ``jax.jit`` nothing is needed beyond sharded operands:
``jax_marlin.marlin_matmul`` carries partitioning rules (``_partitioning.py``,
for Shardy and GSPMD) so that each device runs the kernel on its shard and
the 4-bit weight never moves. Everything here holds for both weight types,
``QuantizedWeight`` (leaves packed, scales) and the 2:4 sparse
``SparseQuantizedWeight`` (values, meta, scales: all split alike, in whole
64-column runs / whole 32-row bands and groups). The modes, by how the
weight is sharded:

- ``"replicated"`` (data parallel): x sharded on its leading dims, weight
  replicated; no communication.
- ``"column"``: weight sharded on N (output columns), shards multiples of 64
  columns; the output is sharded on N; no communication.
- ``"row"``: weight sharded on K in whole groups (per-channel scales stay
  replicated), x resharded to match on K; the partial products are summed by
  one all-reduce of the output (a reduce-scatter when the output is wanted
  sharded over the same mesh axes).

Any mesh axis the weight does not use can shard x's leading dims as well.

This module builds the weight shardings for those modes
(``weight_specs``/``weight_shardings``/``shard_weight``), gives the
``shard_map`` path (``row_parallel_matmul``), and holds the logical-axis
table for a Llama-style decoder (``LOGICAL_AXIS_RULES``, ``LLAMA_PROJECTIONS``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_marlin import _partitioning
from jax_marlin.ops import marlin_matmul
from jax_marlin.quantized_weight import QuantizedWeight
from jax_marlin.sparse_weight import SparseQuantizedWeight

Weight = QuantizedWeight | SparseQuantizedWeight

MODES = ("replicated", "column", "row")


def _axes(axis) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def weight_specs(qw: Weight, mode: str, axis=None) -> Weight:
    """PartitionSpecs of ``qw``'s leaves for ``mode``, as a weight of ``qw``'s type of specs.

    Args:
      qw: the weight, a QuantizedWeight or SparseQuantizedWeight (only its
        type and shapes are used).
      mode: ``"replicated"``, ``"column"`` (split N) or ``"row"`` (split K).
      axis: mesh axis name, or tuple of names, to split over (not for
        ``"replicated"``).

    The result has ``qw``'s pytree structure, so it serves as ``in_specs`` of
    ``jax.shard_map`` or (through ``weight_shardings``) ``in_shardings`` of
    ``jax.jit``. Per-channel scales (one row) stay replicated in row mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    entry = _partitioning._entry(_axes(axis))
    if (mode == "replicated") != (entry is None):
        raise ValueError(
            f"mode {mode!r} needs axis=None" if mode == "replicated"
            else f"mode {mode!r} needs a mesh axis to split over, e.g. axis='model'."
        )
    k, n = {"column": (None, entry), "row": (entry, None)}.get(mode, (None, None))
    return _partitioning.kind_of(qw).specs(k, n, qw.is_per_channel)


def weight_shardings(mesh, qw: Weight, mode: str, axis=None) -> Weight:
    """NamedShardings of ``qw``'s leaves for ``mode`` on ``mesh``, checked.

    Raises ValueError (saying what to change) when the split is unusable:
    column shards not multiples of 64 columns, row shards not multiples of 64
    rows or splitting a group. Use the result with ``jax.device_put`` or as
    ``in_shardings`` of ``jax.jit``.
    """
    specs = weight_specs(qw, mode, axis)
    axes = _axes(axis)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {missing} are not in the mesh {dict(mesh.shape)}.")
    shards = math.prod(mesh.shape[a] for a in axes)
    K, N = qw.shape
    G = qw.scales.shape[-2]
    n_axes, n = (axes, shards) if mode == "column" else ((), 1)
    k_axes, k = (axes, shards) if mode == "row" else ((), 1)
    _partitioning.check_split(K, N, G, n_axes, n, k_axes, k)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda s: isinstance(s, P))


def shard_weight(qw: Weight, mesh, mode: str, axis=None) -> Weight:
    """``jax.device_put(qw, weight_shardings(mesh, qw, mode, axis))``."""
    return jax.device_put(qw, weight_shardings(mesh, qw, mode, axis))


# --- shard_map --------------------------------------------------------------------
#
# Inside jax.shard_map the kernel runs on each device's shards as given:
#
#   data parallel / column parallel:  y = marlin_matmul(x, qw)   (no collective)
#   row parallel:                     y = row_parallel_matmul(x, qw, "model",
#                                                             group_size=g)
#
# with in_specs from weight_specs(qw, mode, axis) and x's specs to match
# (x split on K over the same axes for row parallel).


def row_parallel_matmul(x, qw: Weight, axis_name, *, group_size: int,
                        scatter_dimension: int | None = None) -> jax.Array:
    """Row-parallel x @ W inside ``shard_map``: local kernel call, then psum.

    Args:
      x: this device's (..., K / shards) slice of the activations.
      qw: this device's row shard of the weight (``weight_specs(qw, "row", axis)``),
        dense or 2:4 sparse.
      axis_name: the mesh axis (or tuple of axes) K is split over.
      group_size: the group size of the whole, unsharded weight
        (``qw.group_size`` before sharding; K for per-channel). A shard
        holding exactly one group has one scale row, which alone cannot tell
        a grouped weight from a per-channel one; the kernel needs to know.
      scatter_dimension: None to all-reduce (every device gets the whole
        sum), or an output dimension to reduce-scatter over (each device gets
        its slice of that dimension, as ``jax.lax.psum_scatter(tiled=True)``).
    """
    shards = jax.lax.axis_size(axis_name)
    k_local, g_local = qw.shape[0], qw.scales.shape[-2]
    if group_size != k_local * shards and group_size * g_local != k_local:
        raise ValueError(
            f"row_parallel_matmul: group_size={group_size} does not fit this shard "
            f"({k_local} rows, {g_local} scale rows, {shards} shards); pass the unsharded "
            f"weight's qw.group_size (its K = {k_local * shards} for per-channel)."
        )
    regroup = _partitioning.kind_of(qw).one_group_scales
    if g_local == 1 and group_size == k_local and shards > 1 and regroup is not None:
        # One group per shard: reorder its scales as the per-channel path reads them.
        qw = dataclasses.replace(qw, scales=regroup(qw.scales))
    y = marlin_matmul(x, qw)
    if scatter_dimension is None:
        return jax.lax.psum(y, axis_name)
    return jax.lax.psum_scatter(y, axis_name, scatter_dimension=scatter_dimension, tiled=True)


# --- Logical axes of a Llama-style decoder -----------------------------------------
#
# A QuantDense layer's weight is (K, N) = (input features, output features);
# its packed (K/16, 2N) and scales (K/g, N) leaves (2:4 sparse: values
# (K/32, 2N), meta (K/32, N), scales) carry the same two logical names, since
# a split of K or N in valid shards is a split of those leaves in the same
# places. Per-channel scales have one row: their first name must
# be None. Attention projections are flattened: heads * head_dim columns.
# The fused projections (jax_marlin.models.fusion) have names of their own:
# their columns are not plain heads or MLP units but groups ordered so that
# any contiguous equal split over "model" that the model's
# check_tensor_parallel accepts holds whole groups.

DATA_AXIS = "data"  # mesh axis for batch (data parallel)
MODEL_AXIS = "model"  # mesh axis for tensor parallel (column/row)

# Flax-style (logical name, mesh axis) pairs, e.g. for flax.linen.logical_axis_rules.
LOGICAL_AXIS_RULES = (
    ("batch", DATA_AXIS),  # activations' batch dimension
    ("length", None),  # sequence positions
    ("embed", None),  # model width (d_model): replicated
    ("heads", MODEL_AXIS),  # query heads * head_dim
    ("kv_heads", MODEL_AXIS),  # key/value heads * head_dim (GQA)
    ("mlp", MODEL_AXIS),  # MLP hidden width
    ("qkv", MODEL_AXIS),  # fused q/k/v: per KV head, its query heads, k and v (* head_dim)
    ("gate_up", MODEL_AXIS),  # fused gate/up: 2 * MLP hidden width, interleaved in chunks
)

# Projection -> (input logical axis, output logical axis). With the rules above
# q/k/v/gate/up (and the fused qkv and gate_up) are column parallel (N on
# "model") and o/down row parallel
# (K on "model"): each column/row pair needs one all-reduce and no
# resharding between them, since the column output is split where the row
# input is.
LLAMA_PROJECTIONS = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "qkv_proj": ("embed", "qkv"),  # fused q, k, v
    "gate_up_proj": ("embed", "gate_up"),  # fused gate, up
}


def _mesh_axis(name, rules):
    if name is None:
        return None
    for logical, mesh_axis in rules:
        if logical == name:
            return mesh_axis
    return None  # like flax: a name without a rule is replicated


def logical_weight_specs(logical_axes, *, per_channel: bool = False,
                         rules=LOGICAL_AXIS_RULES, sparsity: str | None = None) -> Weight:
    """PartitionSpecs for a weight whose (K, N) carry ``logical_axes`` (in, out).

    E.g. ``logical_weight_specs(LLAMA_PROJECTIONS["down_proj"])`` gives
    ``packed=P("model", None), scales=P("model", None)`` (row parallel).
    ``sparsity="2:4"`` (as QuantDense's) gives a SparseQuantizedWeight of
    specs: values, meta and scales split alike.
    """
    if sparsity not in (None, "2:4"):
        raise ValueError(f"sparsity must be None or \"2:4\", got {sparsity!r}.")
    k, n = (_mesh_axis(a, rules) for a in logical_axes)
    kind = _partitioning.SPARSE if sparsity == "2:4" else _partitioning.DENSE
    return kind.specs(k, n, per_channel)


def projection_mode(logical_axes, rules=LOGICAL_AXIS_RULES) -> str:
    """How a weight with ``logical_axes`` (in, out) is split under ``rules``.

    "column" (N split), "row" (K split), "replicated", or "2d" (both split:
    also handled by marlin_matmul under jit, with the row all-reduce).
    """
    k, n = (_mesh_axis(a, rules) for a in logical_axes)
    if k is not None and n is not None:
        return "2d"
    return "row" if k is not None else "column" if n is not None else "replicated"
