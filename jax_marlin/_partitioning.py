"""How marlin_matmul is split across devices under jax.jit (Shardy and GSPMD).

XLA cannot see inside the kernel's custom call, so by default it would
replicate the call's operands: all-gather the 4-bit weight onto every device.
``partitioned(local_fn)`` wraps the one-device kernel call in
``jax.experimental.custom_partitioning`` so that each device runs the kernel
on its own shard instead. The plan (``_plan``) reads the shardings the
partitioner proposes and decides:

- N (output columns): sharded as the weight is (column parallel); the output
  is sharded alike. Shards must be multiples of 64 columns: then a column
  slice of ``packed`` (width 2n of 2N) and of ``scales`` (width n) is itself a
  valid Marlin weight (FORMAT.md; the scale permutations work inside runs of
  64/32 columns).
- K (contraction): sharded as the weight is (row parallel), in whole groups;
  x is resharded to match along K, and the partial products are summed with
  ``psum`` (``psum_scatter`` when the output is wanted sharded on the same
  mesh axes along one of its dimensions).
- x's leading dimensions keep their sharding (data parallel), except for mesh
  axes the weight already uses, which x gives up.

The weight's sharding always wins: activations are resharded to fit it, and a
weight sharding the kernel cannot use (N shards not multiples of 64 columns,
K shards splitting a group or not multiples of 64 rows, packed and scales
sharded differently) raises ValueError instead of silently all-gathering the
weight.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_marlin import layout

# Codes per packed row band (FORMAT.md: packed is (K / 16, 2N)).
_BAND = 16


# --- PartitionSpec helpers ------------------------------------------------------


def _axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry (None, a name, or a tuple of names) -> tuple of names."""
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _entry(axes: tuple[str, ...]):
    """Inverse of _axes: () -> None, (a,) -> a, longer -> the tuple."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _spec_axes(sharding, ndim: int) -> list[tuple[str, ...]]:
    """Per-dimension mesh axes of a NamedSharding (None: replicated)."""
    if sharding is None:
        return [()] * ndim
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return [_axes(e) for e in spec[:ndim]]


def _size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


# --- The plan -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    x_spec: P
    packed_spec: P
    scales_spec: P
    out_spec: P
    k_axes: tuple[str, ...]  # mesh axes the contraction is split over (row parallel)
    scatter_dim: int | None  # output dimension psum_scatter splits, or None for psum
    regroup_scales: bool  # each shard holds one group: reorder scales as per-channel


def _weight_axes(dim: str, packed_axes, scales_axes) -> tuple[str, ...]:
    """The weight's mesh axes along K or N, from its two leaves.

    One leaf sharded and the other replicated is fine (the replicated one is
    sliced locally, no communication); two different shardings would need the
    weight to move, which we refuse.
    """
    if not scales_axes or packed_axes == scales_axes:
        return packed_axes
    if not packed_axes:
        return scales_axes
    raise ValueError(
        f"marlin_matmul: the weight's packed and scales are sharded differently along "
        f"{dim} (mesh axes {packed_axes} vs {scales_axes}); shard them alike, e.g. with "
        f"jax_marlin.sharding.weight_shardings(mesh, qw, mode, axis)."
    )


def check_split(K, N, G, n_axes, n_shards, k_axes, k_shards) -> None:
    """Raise ValueError unless a (K, N) weight with G scale rows splits as asked.

    ``n_shards``/``k_shards`` shards along N/K over mesh axes ``n_axes``/``k_axes``
    (named in the messages).
    """
    if N % (64 * n_shards):
        raise ValueError(
            f"marlin_matmul: column-parallel weight shards must be multiples of 64 output "
            f"columns (the kernel's tile and the unit in which the packed layout can be "
            f"cut), but N = {N} over mesh axes {n_axes} ({n_shards} shards) gives "
            f"{N / n_shards:g} columns a shard. Shard N over mesh axes whose size divides "
            f"N / 64 = {N // 64}, or leave the weight's N dimension replicated."
        )
    if K % (64 * k_shards):
        raise ValueError(
            f"marlin_matmul: row-parallel weight shards must be multiples of 64 input rows "
            f"(the kernel's tile), but K = {K} over mesh axes {k_axes} ({k_shards} shards) "
            f"gives {K / k_shards:g} rows a shard. Shard K over mesh axes whose size "
            f"divides K / 64 = {K // 64}, or leave the weight's K dimension replicated."
        )
    if G > 1 and G % k_shards:
        raise ValueError(
            f"marlin_matmul: row-parallel weight shards must hold whole groups, but the "
            f"weight's {G} groups of {K // G} rows do not split into {k_shards} shards "
            f"(mesh axes {k_axes}). Use mesh axes whose size divides {G}, or leave the "
            f"weight's K dimension replicated."
        )


def _plan(mesh, x, packed, scales, result=None) -> _Plan:
    """Decide operand and result shardings from the proposed ones (see module doc).

    ``x``, ``packed``, ``scales``, ``result`` are ShapeDtypeStructs with a
    ``sharding`` (NamedSharding or None); ``result`` is None when inferring.
    """
    ndim = len(x.shape)
    K, N = packed.shape[0] * _BAND, packed.shape[1] // 2
    G = scales.shape[0]
    xs = _spec_axes(x.sharding, ndim)
    ps = _spec_axes(packed.sharding, 2)
    ss = _spec_axes(scales.sharding, 2)

    n_axes = _weight_axes("N", ps[1], ss[1])
    # Per-channel scales have one row: there is nothing to split along K.
    k_axes = _weight_axes("K", ps[0], ss[0] if G > 1 else ())
    if set(n_axes) & set(k_axes):
        raise ValueError(
            f"marlin_matmul: the weight uses mesh axes {sorted(set(n_axes) & set(k_axes))} "
            f"along both K and N; a mesh axis can split only one of them."
        )

    k_shards = _size(mesh, k_axes)
    check_split(K, N, G, n_axes, _size(mesh, n_axes), k_axes, k_shards)

    # x: leading dims keep their axes unless the weight uses them; K follows
    # the weight (resharding an activation is cheap next to moving a weight).
    weight_axes = set(n_axes) | set(k_axes)
    lead = [tuple(a for a in axes if a not in weight_axes) for axes in xs[:-1]]
    out = lead + [n_axes]

    # Row parallel: psum, or psum_scatter onto an output dimension the result
    # is wanted sharded on over exactly the K axes.
    scatter_dim = None
    if k_axes and result is not None:
        wanted = _spec_axes(result.sharding, ndim)
        for d in range(ndim):
            if wanted[d] == k_axes and not out[d] and result.shape[d] % k_shards == 0:
                scatter_dim = d
                out[d] = k_axes
                break

    return _Plan(
        x_spec=P(*(_entry(a) for a in lead), _entry(k_axes)),
        packed_spec=P(_entry(k_axes), _entry(n_axes)),
        scales_spec=P(_entry(k_axes) if G > 1 else None, _entry(n_axes)),
        out_spec=P(*(_entry(a) for a in out)),
        k_axes=k_axes,
        scatter_dim=scatter_dim,
        regroup_scales=G > 1 and G == k_shards,
    )


# --- custom_partitioning callbacks ---------------------------------------------


def _all_named(shapes) -> bool:
    return all(s.sharding is None or isinstance(s.sharding, NamedSharding) for s in shapes)


def _make_partition(local_fn):
    def partition(num_groups, rows_per_group, mesh, arg_shapes, result_shape):
        del num_groups, rows_per_group  # only the Shardy rule needs them
        x, packed, scales = arg_shapes
        if not _all_named((*arg_shapes, result_shape)):
            # No mesh to name axes by (e.g. jit without NamedShardings): only
            # the replicated case is safe to run without moving the weight.
            if all(s.sharding is None or s.sharding.is_fully_replicated
                   for s in (*arg_shapes, result_shape)):
                return (mesh, local_fn, result_shape.sharding,
                        tuple(s.sharding for s in arg_shapes))
            raise ValueError(
                "marlin_matmul: sharded operands without a mesh; use NamedSharding "
                "(jax.sharding.NamedSharding(mesh, PartitionSpec(...))) for x and the weight."
            )
        plan = _plan(mesh, x, packed, scales, result_shape)

        def per_shard(x, packed, scales):
            if plan.regroup_scales:
                scales = layout.grouped_scales_as_per_channel(scales)
            y = local_fn(x, packed, scales)
            if not plan.k_axes:
                return y
            axis = _entry(plan.k_axes)
            if plan.scatter_dim is None:
                return jax.lax.psum(y, axis)
            return jax.lax.psum_scatter(y, axis, scatter_dimension=plan.scatter_dim, tiled=True)

        named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        args = (named(plan.x_spec), named(plan.packed_spec), named(plan.scales_spec))
        return mesh, per_shard, named(plan.out_spec), args

    return partition


def _infer_sharding_from_operands(num_groups, rows_per_group, mesh, arg_shapes, result_shape):
    """GSPMD: the result's sharding given the operands' (Shardy uses _sharding_rule).

    Must not raise: an exception here aborts the process (an XLA CHECK), so
    an unusable weight sharding is reported by ``partition`` instead.
    """
    del num_groups, rows_per_group, result_shape
    if not _all_named(arg_shapes):
        # No mesh axis names: propose replicated (a replicated sharding suits
        # any rank); ``partition`` then accepts it or says what to change.
        known = [s.sharding for s in arg_shapes if s.sharding is not None]
        replicated = [s for s in known if s.is_fully_replicated]
        return (replicated or known)[0]
    try:
        return NamedSharding(mesh, _plan(mesh, *arg_shapes).out_spec)
    except ValueError:
        return NamedSharding(mesh, P())


def _propagate_user_sharding(num_groups, rows_per_group, mesh, user_shape):
    """GSPMD: take the sharding a consumer of the result asks for as the result's."""
    del num_groups, rows_per_group, mesh
    return user_shape.sharding


def _sharding_rule(num_groups, rows_per_group, mesh, operand_types, result_types):
    """Shardy: how dimensions of x, packed, scales and the result correspond.

    K is factored as (g r i): g groups (the scales' rows), r bands of 16 rows
    a group (packed rows are (g r)), i = 16 rows a band. Packed columns are
    (n t): n output columns, t = 2 words a column. K's factors are reduction
    factors: splitting them leaves partial sums in the result. Per-channel
    scales have one row (Shardy allows no size-1 factor in a compound), so
    there K is (r i) and the scales' row is a factor c of its own.
    """
    del mesh, operand_types, result_types
    sizes = dict(i=_BAND, t=2)
    if num_groups == 1:  # per-channel
        return "... (r i), r (n t), c n -> ... n", dict(reduction_factors=("r", "i"), **sizes)
    return "... (g r i), (g r) (n t), g n -> ... n", dict(
        reduction_factors=("g", "r", "i"), r=rows_per_group, **sizes
    )


def _check_not_partly_manual() -> None:
    """Refuse shard_map regions where only some mesh axes are manual.

    There the partitioner hands the rules shardings without mesh axis names
    (or, given a mesh, aborts the process in XLA), and a plain kernel call
    would let XLA gather a weight sharded along the automatic axes.
    """
    mesh = jax.sharding.get_abstract_mesh()
    manual = set(getattr(mesh, "manual_axes", ()))
    if manual and manual != set(mesh.axis_names):
        raise NotImplementedError(
            f"marlin_matmul inside shard_map with only mesh axes {sorted(manual)} manual "
            f"(of {list(mesh.axis_names)}) is not supported. Make every mesh axis manual "
            f"(shard_map's default axis_names) and split the weight with in_specs, e.g. "
            f"jax_marlin.sharding.weight_specs(qw, 'column', 'model'), or call "
            f"marlin_matmul outside shard_map."
        )


def partitioned(local_fn):
    """Wrap ``local_fn(x, packed, scales) -> y`` (one kernel call) for sharded jit.

    The result is called as ``f(x, packed, scales)``. On one device, and
    inside ``shard_map`` (where every mesh axis is manual), it is plain
    ``local_fn``; otherwise each device runs ``local_fn`` on its shard.
    """
    # The static arguments (scale rows, packed rows a scale row) give the
    # Shardy rule its factor sizes.
    op = custom_partitioning(
        lambda x, packed, scales, num_groups, rows_per_group: local_fn(x, packed, scales),
        static_argnums=(3, 4),
    )
    op.def_partition(
        partition=_make_partition(local_fn),
        infer_sharding_from_operands=_infer_sharding_from_operands,
        propagate_user_sharding=_propagate_user_sharding,
        sharding_rule=_sharding_rule,
    )

    def call(x, packed, scales):
        _check_not_partly_manual()
        num_groups = scales.shape[0]
        return op(x, packed, scales, num_groups, packed.shape[0] // num_groups)

    return call


# --- 2:4 sparse weights: data parallel only (for now) -----------------------------
# TODO(issue 8): column/row parallel sparse weights. The layout allows them
# (docs/SPARSE_FORMAT.md: whole 64-column runs and 32-row bands slice into
# valid weights); the plan above would need a third weight leaf. Until then
# a sharded sparse weight is refused rather than silently all-gathered.


def _sparse_weight_sharded(arg_shapes) -> bool:
    return any(s.sharding is not None and not s.sharding.is_fully_replicated for s in arg_shapes[1:])


def _sparse_refuse() -> None:
    raise NotImplementedError(
        "marlin_matmul: sharded 2:4 sparse weights (SparseQuantizedWeight) are not supported "
        "yet; replicate the weight (its values, meta and scales) across the mesh, e.g. "
        "jax.device_put(sqw, NamedSharding(mesh, PartitionSpec())). Sharding x along its "
        "leading (batch) dimensions is supported."
    )


def _sparse_partition(local_fn):
    def partition(mesh, arg_shapes, result_shape):
        if _sparse_weight_sharded(arg_shapes):
            _sparse_refuse()
        x = arg_shapes[0]
        if not _all_named((x, result_shape)) or x.sharding is None:
            return mesh, local_fn, result_shape.sharding, tuple(s.sharding for s in arg_shapes)
        ndim = len(x.shape)
        lead = [_entry(a) for a in _spec_axes(x.sharding, ndim)[:-1]]
        named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        args = (named(P(*lead, None)),) + (named(P()),) * (len(arg_shapes) - 1)
        return mesh, local_fn, named(P(*lead, None)), args

    return partition


def _sparse_infer(mesh, arg_shapes, result_shape):
    del result_shape
    x = arg_shapes[0]
    if not _all_named(arg_shapes) or x.sharding is None:
        known = [s.sharding for s in arg_shapes if s.sharding is not None]
        replicated = [s for s in known if s.is_fully_replicated]
        return (replicated or known)[0]
    lead = [_entry(a) for a in _spec_axes(x.sharding, len(x.shape))[:-1]]
    return NamedSharding(mesh, P(*lead, None))


def partitioned_sparse(local_fn):
    """Wrap ``local_fn(x, values, meta, scales) -> y`` for jit: data parallel, weight replicated.

    A weight sharded along K or N raises NotImplementedError (see the TODO above).
    """
    op = custom_partitioning(local_fn)
    op.def_partition(
        partition=_sparse_partition(local_fn),
        infer_sharding_from_operands=_sparse_infer,
        propagate_user_sharding=lambda mesh, user_shape: user_shape.sharding,
        # Weight dimensions share factors with the result's N only through
        # the scales, so a column-sharded weight reaches ``partition`` (and is
        # refused there) instead of being gathered by the partitioner.
        sharding_rule="... k, b w, b n, g n -> ... n",
    )

    def call(x, values, meta, scales):
        _check_not_partly_manual()
        return op(x, values, meta, scales)

    return call
