"""How marlin_matmul is split across devices under jax.jit (Shardy and GSPMD).

XLA cannot see inside the kernel's custom call, so by default it would
replicate the call's operands: all-gather the 4-bit weight onto every device.
``partitioned(local_fn, kind)`` wraps the one-device kernel call in
``jax.experimental.custom_partitioning`` so that each device runs the kernel
on its own shard instead. The rules are the same for both weight types,
dense ``QuantizedWeight`` (leaves packed, scales) and 2:4 sparse
``SparseQuantizedWeight`` (values, meta, scales): every leaf is laid out
(rows along K, columns along N), and a ``WeightKind`` says how many K rows a
row and how many words an output column each leaf has. The plan (``_plan``)
reads the shardings the partitioner proposes and decides:

- N (output columns): sharded as the weight is (column parallel); the output
  is sharded alike. Shards must be multiples of 64 columns: then a column
  slice of every leaf is itself a valid weight (FORMAT.md: the scale
  permutations work inside runs of 64/32 columns; SPARSE_FORMAT.md: nothing
  crosses a run of 64 columns).
- K (contraction): sharded as the weight is (row parallel), in whole groups
  (and multiples of 64 rows, so whole bands of either layout); x is resharded
  to match along K, and the partial products are summed with ``psum``
  (``psum_scatter`` when the output is wanted sharded on the same mesh axes
  along one of its dimensions).
- x's leading dimensions keep their sharding (data parallel), except for mesh
  axes the weight already uses, which x gives up.

The weight's sharding always wins: activations are resharded to fit it, and a
weight sharding the kernel cannot use (N shards not multiples of 64 columns,
K shards splitting a group or not multiples of 64 rows, leaves sharded
differently) raises ValueError instead of silently all-gathering the weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_marlin import layout, sparse_layout
from jax_marlin.quantized_weight import QuantizedWeight
from jax_marlin.sparse_weight import SparseQuantizedWeight

# --- The weight types' leaves ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightKind:
    """What the sharding rules need to know about one weight type's leaves.

    Each code leaf ``name`` is (K // band, width * N); the last leaf, scales,
    is (K // g, N) (one row: per-channel).
    """

    type: type
    codes: tuple[tuple[str, int], ...]  # (leaf name, words an output column), pytree order
    band: int  # K rows a row of the code leaves
    # A row shard holding exactly one group has one scale row, which the kernel
    # reads as per-channel: this reorders that grouped row for it (None: the
    # layout uses one scale order for both, nothing to do).
    one_group_scales: Callable | None

    @property
    def leaves(self) -> tuple[str, ...]:
        """Leaf names in pytree order (scales last)."""
        return tuple(name for name, _ in self.codes) + ("scales",)

    def specs(self, k_entry, n_entry, per_channel: bool):
        """A weight of this type holding each leaf's PartitionSpec for a split of
        K over ``k_entry`` and N over ``n_entry`` (PartitionSpec entries).

        Per-channel scales (one row) are never split along K.
        """
        return self.type(**{name: P(k_entry, n_entry) for name, _ in self.codes},
                         scales=P(None if per_channel else k_entry, n_entry))


# Dense (FORMAT.md): packed (K / 16, 2N); a one-group shard's scale row goes
# into the per-channel order.
DENSE = WeightKind(QuantizedWeight, (("packed", 2),), 16, layout.grouped_scales_as_per_channel)
# 2:4 sparse (SPARSE_FORMAT.md): values (K / 32, 2N), meta (K / 32, N); the
# layout keeps the grouped scale order for per-channel scales too.
SPARSE = WeightKind(SparseQuantizedWeight, (("values", 2), ("meta", 1)), sparse_layout.BAND, None)
KINDS = (DENSE, SPARSE)


def kind_of(qw) -> WeightKind:
    """The WeightKind of a QuantizedWeight or SparseQuantizedWeight (TypeError otherwise)."""
    for kind in KINDS:
        if isinstance(qw, kind.type):
            return kind
    raise TypeError(
        f"expected a jax_marlin.QuantizedWeight or SparseQuantizedWeight, got {type(qw).__name__}."
    )


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
    weight_specs: tuple[P, ...]  # one per leaf, in pytree order
    out_spec: P
    k_axes: tuple[str, ...]  # mesh axes the contraction is split over (row parallel)
    scatter_dim: int | None  # output dimension psum_scatter splits, or None for psum
    regroup_scales: bool  # each shard holds one group: reorder scales as per-channel


def _weight_axes(dim: str, leaf_axes: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The weight's mesh axes along K or N, from its leaves' ({name: axes}).

    Some leaves sharded and the others replicated is fine (a replicated one
    is sliced locally, no communication); two different shardings would need
    the weight to move, which we refuse.
    """
    sharded = {axes for axes in leaf_axes.values() if axes}
    if len(sharded) <= 1:
        return next(iter(sharded), ())
    listed = ", ".join(f"{name} {axes}" for name, axes in leaf_axes.items())
    raise ValueError(
        f"marlin_matmul: the weight's leaves are sharded differently along {dim} (mesh "
        f"axes: {listed}); shard them alike, e.g. with "
        f"jax_marlin.sharding.weight_shardings(mesh, qw, mode, axis)."
    )


def check_split(K, N, G, n_axes, n_shards, k_axes, k_shards) -> None:
    """Raise ValueError unless a (K, N) weight with G scale rows splits as asked.

    ``n_shards``/``k_shards`` shards along N/K over mesh axes ``n_axes``/``k_axes``
    (named in the messages). The same limits hold for both layouts: 64 columns
    are a run of either, 64 rows whole bands of either.
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


def _plan(mesh, kind: WeightKind, arg_shapes, result=None) -> _Plan:
    """Decide operand and result shardings from the proposed ones (see module doc).

    ``arg_shapes`` are x and the weight's leaves (in ``kind.leaves`` order),
    ``result`` the result: ShapeDtypeStructs with a ``sharding``
    (NamedSharding or None); ``result`` is None when inferring.
    """
    x, *leaves = arg_shapes
    ndim = len(x.shape)
    scales = leaves[-1]
    K, N = leaves[0].shape[0] * kind.band, scales.shape[1]
    G = scales.shape[0]
    xs = _spec_axes(x.sharding, ndim)
    ws = {name: _spec_axes(leaf.sharding, 2) for name, leaf in zip(kind.leaves, leaves)}

    n_axes = _weight_axes("N", {name: a[1] for name, a in ws.items()})
    # Per-channel scales have one row: there is nothing to split along K.
    k_axes = _weight_axes("K", {name: a[0] for name, a in ws.items()
                                if name != "scales" or G > 1})
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

    specs = kind.specs(_entry(k_axes), _entry(n_axes), per_channel=G == 1)
    return _Plan(
        x_spec=P(*(_entry(a) for a in lead), _entry(k_axes)),
        weight_specs=tuple(getattr(specs, name) for name in kind.leaves),
        out_spec=P(*(_entry(a) for a in out)),
        k_axes=k_axes,
        scatter_dim=scatter_dim,
        regroup_scales=G > 1 and G == k_shards and kind.one_group_scales is not None,
    )


# --- custom_partitioning callbacks ---------------------------------------------


def _all_named(shapes) -> bool:
    return all(s.sharding is None or isinstance(s.sharding, NamedSharding) for s in shapes)


def _make_partition(local_fn, kind: WeightKind):
    def partition(num_groups, rows_per_group, mesh, arg_shapes, result_shape):
        del num_groups, rows_per_group  # only the Shardy rule needs them
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
        plan = _plan(mesh, kind, arg_shapes, result_shape)

        def per_shard(x, *leaves):
            if plan.regroup_scales:
                leaves = (*leaves[:-1], kind.one_group_scales(leaves[-1]))
            y = local_fn(x, *leaves)
            if not plan.k_axes:
                return y
            axis = _entry(plan.k_axes)
            if plan.scatter_dim is None:
                return jax.lax.psum(y, axis)
            return jax.lax.psum_scatter(y, axis, scatter_dimension=plan.scatter_dim, tiled=True)

        named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        args = (named(plan.x_spec), *(named(s) for s in plan.weight_specs))
        return mesh, per_shard, named(plan.out_spec), args

    return partition


def _make_infer(kind: WeightKind):
    def infer_sharding_from_operands(num_groups, rows_per_group, mesh, arg_shapes, result_shape):
        """GSPMD: the result's sharding given the operands' (Shardy uses the sharding rule).

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
            return NamedSharding(mesh, _plan(mesh, kind, arg_shapes).out_spec)
        except ValueError:
            return NamedSharding(mesh, P())

    return infer_sharding_from_operands


def _propagate_user_sharding(num_groups, rows_per_group, mesh, user_shape):
    """GSPMD: take the sharding a consumer of the result asks for as the result's."""
    del num_groups, rows_per_group, mesh
    return user_shape.sharding


def _sharding_rule(kind: WeightKind, num_groups, rows_per_group, mesh, operand_types,
                   result_types):
    """Shardy: how dimensions of x, the weight's leaves and the result correspond.

    K is factored as (g r i): g groups (the scales' rows), r code rows a
    group (code leaves' rows are (g r)), i = ``kind.band`` rows a code row.
    A code leaf's columns are (n t): n output columns, t words a column (just
    n for one word). K's factors are reduction factors: splitting them leaves
    partial sums in the result. Shardy allows no size-1 factor in a compound,
    so a factor of size 1 is left out: one code row a group makes K (g i);
    per-channel scales have one row, so there K is (r i) and the scales' row
    is a factor c of its own.
    """
    del mesh, operand_types, result_types
    sizes = dict(g=num_groups, r=rows_per_group, i=kind.band, t=2)
    k = [f for f in ("g", "r") if sizes[f] > 1] + ["i"]
    operands = [["...", k]]
    for _, width in kind.codes:
        operands.append([k[:-1], ["n", "t"] if width == 2 else ["n"]])
    operands.append([["g"] if num_groups > 1 else ["c"], ["n"]])

    def dim(d):
        return d if isinstance(d, str) else d[0] if len(d) == 1 else "(" + " ".join(d) + ")"

    rule = ", ".join(" ".join(dim(d) for d in op) for op in operands) + " -> ... n"
    # Sizes for the factors that never stand for a whole dimension (only those).
    dims = [d for op in operands for d in op if not isinstance(d, str)]
    compound = {f for d in dims if len(d) > 1 for f in d}
    whole = {d[0] for d in dims if len(d) == 1}
    return rule, dict(reduction_factors=tuple(k), **{f: sizes[f] for f in compound - whole})


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


def partitioned(local_fn, kind: WeightKind = DENSE):
    """Wrap ``local_fn(x, *leaves) -> y`` (one kernel call) for sharded jit.

    ``leaves`` are the weight's leaves in ``kind.leaves`` order (dense:
    packed, scales; sparse: values, meta, scales). The result is called as
    ``f(x, *leaves)``. On one device, and inside ``shard_map`` (where every
    mesh axis is manual), it is plain ``local_fn``; otherwise each device
    runs ``local_fn`` on its shard.
    """
    n = len(kind.leaves)
    # The static arguments (scale rows, code rows a scale row) give the
    # Shardy rule its factor sizes.
    op = custom_partitioning(
        lambda x, *rest: local_fn(x, *rest[:n]),
        static_argnums=(n + 1, n + 2),
    )
    op.def_partition(
        partition=_make_partition(local_fn, kind),
        infer_sharding_from_operands=_make_infer(kind),
        propagate_user_sharding=_propagate_user_sharding,
        sharding_rule=functools.partial(_sharding_rule, kind),
    )

    def call(x, *leaves):
        _check_not_partly_manual()
        num_groups = leaves[-1].shape[0]
        return op(x, *leaves, num_groups, leaves[0].shape[0] // num_groups)

    return call
