"""Sharded 2:4 sparse marlin_matmul on 8 devices (run by tests/test_sparse.py in a child process).

The sparse weight (values, meta, scales) is split by the same rules as the
dense one (tests/multidevice_sharding.py, whose helpers this file uses):
data, column and row parallel and their combinations with a data axis, on
meshes (8,), (2, 4) and (4, 2), under Shardy and GSPMD; no leaf of the
weight is ever all-gathered, and row parallel needs exactly one all-reduce
(or reduce-scatter) of the output. Splits the layout cannot take raise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from multidevice_sharding import (  # noqa: F401  (fixtures: mesh, partitioner)
    LEAD,
    K,
    N,
    assert_spec,
    collectives,
    data_axis,
    local_shape,
    mesh,
    partitioner,
    put,
)

import jax_marlin as jm
from jax_marlin import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

TOLERANCE = {np.dtype(jnp.float16): 2e-3, np.dtype(jnp.bfloat16): 1e-2}


def sparse_weight(seed, k, n, group_size, dtype=jnp.float16) -> jm.SparseQuantizedWeight:
    """Random 2:4 codes (a random 2-of-4 mask along K) and scales around 0.01."""
    rng = np.random.default_rng(seed)
    rank = np.argsort(np.argsort(rng.random((k // 4, 4, n)), axis=1), axis=1)
    mask = (rank < 2).reshape(k, n)
    codes = np.where(mask, rng.integers(0, 16, (k, n)), 8).astype(np.uint8)
    G = 1 if group_size is None else k // group_size
    scales = rng.uniform(0.005, 0.015, (G, n)).astype(dtype)
    return jm.pack_sparse(codes, scales)


def problem(util, group_size=64, dtype=jnp.float16, n=N, seed=0):
    sqw = sparse_weight(seed, K, n, group_size, dtype)
    x = util.random_x(seed + 1, (*LEAD, K), dtype)
    return x, sqw


def sharded_call(mesh, x, sqw, x_spec, mode, axis, out_spec=None):
    xs = put(mesh, x, x_spec)
    ws = sharding.shard_weight(sqw, mesh, mode, axis)
    out = None if out_spec is None else NamedSharding(mesh, out_spec)
    return jax.jit(jm.marlin_matmul, out_shardings=out), xs, ws


def close_to_one_device(y, x, sqw, util):
    """Row parallel: partial sums are rounded to the dtype before they are added,
    so close to the one-device result (and the float32 reference), not bit-equal."""
    util.assert_close(y, x, sqw)
    assert util.rel_err(y, jm.marlin_matmul(x, sqw)) <= TOLERANCE[np.dtype(x.dtype)]


def no_weight_gather(found):
    return not any(op == "all-gather" for op, _, _ in found)


# --- jit: the partitioning rules -------------------------------------------------


def test_data_parallel(mesh, util):
    x, sqw = problem(util)
    f, xs, ws = sharded_call(mesh, x, sqw, P(mesh.axis_names), "replicated", None)
    y = f(xs, ws)
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, sqw))
    assert_spec(y, P(mesh.axis_names))
    assert collectives(f, xs, ws) == []


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_column_parallel(mesh, dtype, util):
    x, sqw = problem(util, dtype=dtype)
    d = data_axis(mesh)
    f, xs, ws = sharded_call(mesh, x, sqw, P(d), "column", "model")
    assert ws.values.sharding.spec == P(None, "model") and ws.meta.sharding.spec == P(None, "model")
    y = f(xs, ws)
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, sqw))  # same sums, same order
    assert_spec(y, P(d, None, "model"))
    assert collectives(f, xs, ws) == []  # values, meta, scales stay where they are


@pytest.mark.parametrize("group_size", [32, 64, 128, None], ids=["g32", "g64", "g128", "per_channel"])
def test_row_parallel(mesh, group_size, util):
    # g64 on the 8-device mesh and g128 on 4 model shards: each shard holds
    # one group, one scale row (the sparse layout reads it in the grouped
    # order either way: nothing to reorder). g32: one band a group.
    if group_size is not None and K // group_size < mesh.shape["model"]:
        pytest.skip("fewer groups than model shards (test_unusable_split_raises)")
    x, sqw = problem(util, group_size)
    d = data_axis(mesh)
    f, xs, ws = sharded_call(mesh, x, sqw, P(d, None, "model"), "row", "model")
    y = f(xs, ws)
    assert_spec(y, P(d))
    close_to_one_device(y, x, sqw, util)
    # Exactly one all-reduce, of this device's whole output, and nothing else.
    assert collectives(f, xs, ws) == [("all-reduce", "f16", local_shape(y))]


def test_row_parallel_x_replicated(mesh, util):
    """x not split on K: each device slices its K part locally (no x movement)."""
    x, sqw = problem(util)
    f, xs, ws = sharded_call(mesh, x, sqw, P(data_axis(mesh)), "row", "model")
    y = f(xs, ws)
    close_to_one_device(y, x, sqw, util)
    assert collectives(f, xs, ws) == [("all-reduce", "f16", local_shape(y))]


@pytest.mark.parametrize("dim", [1, 2], ids=["seq", "features"])
def test_row_parallel_reduce_scatter(mesh, dim, util):
    """Output wanted split over the K axis: one reduce-scatter instead of the all-reduce."""
    x, sqw = problem(util)
    d = data_axis(mesh)
    out = [d, None, None]
    out[dim] = "model"
    f, xs, ws = sharded_call(mesh, x, sqw, P(d, None, "model"), "row", "model", P(*out))
    y = f(xs, ws)
    assert_spec(y, P(*out))
    close_to_one_device(y, x, sqw, util)
    assert collectives(f, xs, ws) == [("reduce-scatter", "f16", local_shape(y))]


def test_2d_weight(util):
    """K over "data", N over "model" (both split): the row all-reduce over "data" only."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    x, sqw = problem(util)
    specs = jm.SparseQuantizedWeight(values=P("data", "model"), meta=P("data", "model"),
                                     scales=P("data", "model"))
    ws = jax.device_put(sqw, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                          is_leaf=lambda s: isinstance(s, P)))
    xs = put(mesh, x, P())
    f = jax.jit(jm.marlin_matmul)
    y = f(xs, ws)
    assert_spec(y, P(None, None, "model"))
    close_to_one_device(y, x, sqw, util)
    assert collectives(f, xs, ws) == [("all-reduce", "f16", local_shape(y))]


def test_mlp_column_then_row(mesh, util):
    """up (column) feeds down (row) with no resharding: one all-reduce in all."""
    x, up = problem(util, seed=2)
    down = sparse_weight(4, N, K, 64)
    d = data_axis(mesh)

    def mlp(x, up, down):
        return jm.marlin_matmul(jax.nn.relu(jm.marlin_matmul(x, up)), down)

    xs = put(mesh, x, P(d))
    ups = sharding.shard_weight(up, mesh, "column", "model")
    downs = sharding.shard_weight(down, mesh, "row", "model")
    f = jax.jit(mlp)
    y = f(xs, ups, downs)
    assert util.rel_err(y, mlp(x, up, down)) <= TOLERANCE[np.dtype(x.dtype)]
    assert collectives(f, xs, ups, downs) == [("all-reduce", "f16", local_shape(y))]


def test_eager_call_and_vmap_on_sharded_arrays(mesh, util):
    x, sqw = problem(util)
    ws = sharding.shard_weight(sqw, mesh, "column", "model")
    y = jm.marlin_matmul(put(mesh, x, P()), ws)
    assert_spec(y, P(None, None, "model"))
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, sqw))
    xs = put(mesh, x, P(data_axis(mesh)))
    f = jax.jit(jax.vmap(jm.marlin_matmul, in_axes=(0, None)))
    np.testing.assert_array_equal(f(xs, ws), jm.marlin_matmul(x, sqw))
    assert collectives(f, xs, ws) == []


# --- unusable shardings: clear errors, no silent weight all-gather ---------------


def _eight():
    return Mesh(np.array(jax.devices()[:8]), ("model",))


@pytest.mark.parametrize(
    "n, group_size, mode, match",
    [
        (256, 64, "column", "multiples of 64 output columns"),
        (512, 128, "row", "whole groups"),
    ],
)
def test_unusable_split_raises(n, group_size, mode, match, util):
    mesh = _eight()
    x, sqw = problem(util, group_size, n=n)
    # Up front, from the helper that builds shardings ...
    with pytest.raises(ValueError, match=match):
        sharding.weight_shardings(mesh, sqw, mode, "model")
    # ... and from the partitioner when values and meta are split by hand
    # (scales replicated: there are fewer scale rows than devices).
    specs = sharding.weight_specs(sqw, mode, "model")
    ws = jm.SparseQuantizedWeight(values=put(mesh, sqw.values, specs.values),
                                  meta=put(mesh, sqw.meta, specs.meta),
                                  scales=put(mesh, sqw.scales, P()))
    with pytest.raises(Exception, match=match):
        jax.jit(jm.marlin_matmul)(put(mesh, x, P()), ws)


def test_rows_not_whole_tiles_raise(util):
    """32-row shards: whole bands of the sparse layout, but not the kernel's 64-row tile."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    x, sqw = problem(util, None)
    small = jm.SparseQuantizedWeight(values=sqw.values[:4], meta=sqw.meta[:4],
                                     scales=sqw.scales)  # K = 128, per-channel: 4 x 32 rows
    with pytest.raises(ValueError, match="multiples of 64 input rows"):
        sharding.weight_shardings(mesh, small, "row", "model")
    specs = sharding.weight_specs(small, "row", "model")
    ws = jm.SparseQuantizedWeight(values=put(mesh, small.values, specs.values),
                                  meta=put(mesh, small.meta, specs.meta),
                                  scales=put(mesh, small.scales, specs.scales))
    with pytest.raises(Exception, match="multiples of 64 input rows"):
        jax.jit(jm.marlin_matmul)(put(mesh, x[..., :128], P()), ws)


def test_leaves_split_differently_raise(util):
    mesh = _eight()
    x, sqw = problem(util, 64)
    ws = jm.SparseQuantizedWeight(values=put(mesh, sqw.values, P(None, "model")),
                                  meta=put(mesh, sqw.meta, P("model", None)),
                                  scales=put(mesh, sqw.scales, P(None, "model")))
    with pytest.raises(Exception, match="along both K and N"):
        jax.jit(jm.marlin_matmul)(put(mesh, x, P()), ws)
    mesh2 = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    ws = jm.SparseQuantizedWeight(values=put(mesh2, sqw.values, P(None, "model")),
                                  meta=put(mesh2, sqw.meta, P(None, "data")),
                                  scales=put(mesh2, sqw.scales, P()))
    with pytest.raises(Exception, match="leaves are sharded differently along N"):
        jax.jit(jm.marlin_matmul)(put(mesh2, x, P()), ws)


# --- shard_map: the kernel per shard, collectives written by hand -----------------


def test_shard_map_column(mesh, util):
    x, sqw = problem(util)
    d = data_axis(mesh)
    f = jax.jit(jax.shard_map(
        jm.marlin_matmul, mesh=mesh,
        in_specs=(P(d), sharding.weight_specs(sqw, "column", "model")),
        out_specs=P(d, None, "model"),
    ))
    ws = sharding.shard_weight(sqw, mesh, "column", "model")
    xs = put(mesh, x, P(d))
    np.testing.assert_array_equal(f(xs, ws), jm.marlin_matmul(x, sqw))
    assert collectives(f, xs, ws) == []


@pytest.mark.parametrize("group_size", [64, None], ids=["g64", "per_channel"])
@pytest.mark.parametrize("scatter", [None, 2], ids=["psum", "psum_scatter"])
def test_shard_map_row(mesh, group_size, scatter, util):
    x, sqw = problem(util, group_size)
    d = data_axis(mesh)
    g = sqw.group_size

    def row(x, w):
        return sharding.row_parallel_matmul(x, w, "model", group_size=g,
                                            scatter_dimension=scatter)

    out = P(d) if scatter is None else P(d, None, "model")
    f = jax.jit(jax.shard_map(
        row, mesh=mesh,
        in_specs=(P(d, None, "model"), sharding.weight_specs(sqw, "row", "model")),
        out_specs=out,
    ))
    xs = put(mesh, x, P(d, None, "model"))
    ws = sharding.shard_weight(sqw, mesh, "row", "model")
    y = f(xs, ws)
    util.assert_close(y, x, sqw)
    op = "all-reduce" if scatter is None else "reduce-scatter"
    assert collectives(f, xs, ws) == [(op, "f16", local_shape(y))]


# --- a sparse QuantDense MLP block placed by its logical axis names ---------------


def test_quantdense_sparse_mlp_block(mesh, util):
    """A Llama MLP block of jm.QuantDense(sparsity="2:4") layers (gate/up column
    parallel, down row parallel, as LLAMA_PROJECTIONS names them), placed by
    those names under LOGICAL_AXIS_RULES: equal to one device's, with one
    all-reduce of the output and nothing else."""
    nnx = pytest.importorskip("flax.nnx")
    from jax_marlin.models import llama

    F = 1024

    class Block(nnx.Module):
        def __init__(self, rngs):
            def proj(name, k, n):
                init = nnx.with_partitioning(nnx.initializers.normal(0.05),
                                             sharding.LLAMA_PROJECTIONS[name])
                return jm.QuantDense(k, n, use_bias=False, group_size=64, kernel_init=init,
                                     param_dtype=jnp.float16, sparsity="2:4", rngs=rngs)
            self.gate, self.up, self.down = proj("gate_proj", K, F), proj("up_proj", K, F), \
                proj("down_proj", F, K)

        def __call__(self, x):
            return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

    with nnx.use_eager_sharding(False):  # names only; placed explicitly below
        block = Block(nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    x = util.random_x(9, (*LEAD, K), jnp.float16)

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    ref = jax.jit(run)(state, x)
    placed = jax.device_put(state, llama.param_shardings(state, mesh, sharding.LOGICAL_AXIS_RULES))
    # The names did their job: every leaf of gate/up split on N, of down on K.
    for leaf in ("values", "meta", "scales"):
        assert placed["gate"][leaf].sharding.spec == P(None, "model"), leaf
        assert placed["up"][leaf].sharding.spec == P(None, "model"), leaf
        assert placed["down"][leaf].sharding.spec == P("model", None), leaf
    xs = put(mesh, x, P(data_axis(mesh)))
    f = jax.jit(run)
    y = f(placed, xs)
    assert util.rel_err(y, ref) <= TOLERANCE[np.dtype(x.dtype)]
    assert collectives(f, placed, xs) == [("all-reduce", "f16", local_shape(y))]
