"""Sharded marlin_matmul on 8 devices: results and compiled collectives.

Needs 8 devices, so it runs in its own process: tests/test_sharding.py starts
``python -m pytest tests/multidevice_sharding.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``
(the name does not start with ``test_``, so the main run does not collect it).
Run it directly the same way. Every test runs under both partitioners
(Shardy, the default, and GSPMD). The tests that take the ``kind`` fixture
run for both weight kinds, dense ``jm.QuantizedWeight`` and 2:4 sparse
``jm.SparseQuantizedWeight``; the tests only one kind needs are here (dense)
and in tests/multidevice_sparse.py (sparse, run by tests/test_sparse.py).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_marlin as jm
from jax_marlin import sharding

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)

# Mesh shape -> axis names. On the 1-D mesh tensor parallelism uses all 8
# devices and there is no data axis.
MESHES = {(8,): ("model",), (2, 4): ("data", "model"), (4, 2): ("data", "model")}
MESH_IDS = ["8", "2x4", "4x2"]

K, N = 512, 512
LEAD = (8, 8)  # x is (8, 8, K): leading dims, the first split by the data axis


@pytest.fixture(params=["shardy", "gspmd"], autouse=True)
def partitioner(request):
    old = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", request.param == "shardy")
    yield request.param
    jax.config.update("jax_use_shardy_partitioner", old)


@pytest.fixture(params=["dense", "sparse"])
def kind(request):
    """Which weight the shared tests build: jm.QuantizedWeight or jm.SparseQuantizedWeight."""
    return request.param


@pytest.fixture(params=list(MESHES), ids=MESH_IDS)
def mesh(request):
    shape = request.param
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), MESHES[shape])


def data_axis(mesh):
    return "data" if "data" in mesh.axis_names else None


# --- compiled-HLO collectives --------------------------------------------------

_COLLECTIVE = re.compile(
    r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def collectives(jitted, *args):
    """[(op, dtype, shape)] of the collectives in the compiled module."""
    found = []
    for line in jitted.lower(*args).compile().as_text().splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            t = re.match(r"\(?(\w+)\[([\d,]*)\]", m.group(1))
            shape = tuple(int(d) for d in t.group(2).split(",") if d)
            found.append((m.group(2), t.group(1), shape))
    return found


def assert_spec(y, spec):
    """y is laid out as PartitionSpec ``spec`` (trailing Nones do not matter)."""
    assert y.sharding.is_equivalent_to(NamedSharding(y.sharding.mesh, spec), y.ndim), (
        f"{y.sharding.spec} != {spec}"
    )


def local_shape(y):
    return y.sharding.shard_shape(y.shape)


# --- helpers -------------------------------------------------------------------


def put(mesh, a, spec):
    return jax.device_put(a, NamedSharding(mesh, spec))


def sparse_weight(seed, k, n, group_size, dtype=jnp.float16) -> jm.SparseQuantizedWeight:
    """Random 2:4 codes (a random 2-of-4 mask along K) and scales around 0.01."""
    rng = np.random.default_rng(seed)
    rank = np.argsort(np.argsort(rng.random((k // 4, 4, n)), axis=1), axis=1)
    mask = (rank < 2).reshape(k, n)
    codes = np.where(mask, rng.integers(0, 16, (k, n)), 8).astype(np.uint8)
    G = 1 if group_size is None else k // group_size
    scales = rng.uniform(0.005, 0.015, (G, n)).astype(dtype)
    return jm.pack_sparse(codes, scales)


def weight(util, kind, seed, k, n, group_size, dtype=jnp.float16):
    """A random (k, n) weight of the given kind ("dense" or "sparse")."""
    if kind == "dense":
        return util.random_weight(seed, k, n, group_size, dtype)
    assert kind == "sparse", kind
    return sparse_weight(seed, k, n, group_size, dtype)


# The leaves of each kind that hold the (K, N) codes (split like the weight).
CODE_LEAVES = {"dense": ("packed",), "sparse": ("values", "meta")}


def problem(util, group_size=64, dtype=jnp.float16, n=N, seed=0, kind="dense"):
    qw = weight(util, kind, seed, K, n, group_size, dtype)
    x = util.random_x(seed + 1, (*LEAD, K), dtype)
    return x, qw


def close_to_one_device(y, x, qw, util):
    """Row parallel: partial sums are rounded to the dtype before they are added,
    so close to the one-device result (and the float32 reference), not bit-equal."""
    util.assert_close(y, x, qw)
    assert util.rel_err(y, jm.marlin_matmul(x, qw)) <= util.TOLERANCE[np.dtype(x.dtype)]


def put_leaves(mesh, w, specs, **override):
    """Place each leaf of weight w by hand: specs' spec for it, or override[name]."""
    return dataclasses.replace(w, **{
        f.name: put(mesh, getattr(w, f.name), override.get(f.name, getattr(specs, f.name)))
        for f in dataclasses.fields(w)
    })


def sharded_call(mesh, x, qw, x_spec, mode, axis, out_spec=None):
    """jit(marlin_matmul) on sharded operands -> (jitted, x_sharded, qw_sharded)."""
    xs = put(mesh, x, x_spec)
    qs = sharding.shard_weight(qw, mesh, mode, axis)
    out = None if out_spec is None else NamedSharding(mesh, out_spec)
    return jax.jit(jm.marlin_matmul, out_shardings=out), xs, qs


# --- jit: the partitioning rules -------------------------------------------------


def test_data_parallel(mesh, kind, util):
    x, qw = problem(util, kind=kind)
    f, xs, qs = sharded_call(mesh, x, qw, P(mesh.axis_names), "replicated", None)
    y = f(xs, qs)
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, qw))
    assert_spec(y, P(mesh.axis_names))
    assert collectives(f, xs, qs) == []


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_column_parallel(mesh, dtype, kind, util):
    x, qw = problem(util, dtype=dtype, kind=kind)
    d = data_axis(mesh)
    f, xs, qs = sharded_call(mesh, x, qw, P(d), "column", "model")
    for leaf in CODE_LEAVES[kind]:
        assert getattr(qs, leaf).sharding.spec == P(None, "model"), leaf
    y = f(xs, qs)
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, qw))  # same sums, same order
    assert_spec(y, P(d, None, "model"))
    assert collectives(f, xs, qs) == []  # every leaf of the weight stays where it is


@pytest.mark.parametrize(
    "kind, group_size",
    [("dense", 64), ("dense", None),
     ("sparse", 32), ("sparse", 64), ("sparse", 128), ("sparse", None)],
    ids=["dense-g64", "dense-per_channel",
         "sparse-g32", "sparse-g64", "sparse-g128", "sparse-per_channel"],
)
def test_row_parallel(mesh, kind, group_size, util):
    # Dense: on the 8-device mesh each shard holds one group of 64 rows (its
    # scales need the per-channel order; the rules reorder them).
    # Sparse: g64 on the 8-device mesh and g128 on 4 model shards: each shard
    # holds one group, one scale row (the sparse layout reads it in the grouped
    # order either way: nothing to reorder). g32: one band a group.
    if group_size is not None and K // group_size < mesh.shape["model"]:
        pytest.skip("fewer groups than model shards (test_unusable_split_raises)")
    x, qw = problem(util, group_size, kind=kind)
    d = data_axis(mesh)
    f, xs, qs = sharded_call(mesh, x, qw, P(d, None, "model"), "row", "model")
    y = f(xs, qs)
    assert_spec(y, P(d))
    # Partial sums are rounded to float16 before they are added: close to the
    # one-device result, not bit-equal.
    close_to_one_device(y, x, qw, util)
    # Exactly one all-reduce, of this device's whole output, and nothing else.
    assert collectives(f, xs, qs) == [("all-reduce", "f16", local_shape(y))]


def test_row_parallel_x_replicated(mesh, kind, util):
    """x not split on K: each device slices its K part locally (no x movement)."""
    x, qw = problem(util, kind=kind)
    f, xs, qs = sharded_call(mesh, x, qw, P(data_axis(mesh)), "row", "model")
    y = f(xs, qs)
    close_to_one_device(y, x, qw, util)
    assert collectives(f, xs, qs) == [("all-reduce", "f16", local_shape(y))]


@pytest.mark.parametrize("dim", [1, 2], ids=["seq", "features"])
def test_row_parallel_reduce_scatter(mesh, dim, kind, util):
    """Output wanted split over the K axis: one reduce-scatter instead of the all-reduce."""
    x, qw = problem(util, kind=kind)
    d = data_axis(mesh)
    out = [d, None, None]
    out[dim] = "model"
    f, xs, qs = sharded_call(mesh, x, qw, P(d, None, "model"), "row", "model", P(*out))
    y = f(xs, qs)
    assert_spec(y, P(*out))
    close_to_one_device(y, x, qw, util)
    assert collectives(f, xs, qs) == [("reduce-scatter", "f16", local_shape(y))]


def test_mlp_column_then_row(mesh, kind, util):
    """up (column) feeds down (row) with no resharding: one all-reduce in all."""
    x, up = problem(util, seed=2, kind=kind)
    down = weight(util, kind, 4, N, K, 64)
    d = data_axis(mesh)

    def mlp(x, up, down):
        return jm.marlin_matmul(jax.nn.relu(jm.marlin_matmul(x, up)), down)

    xs = put(mesh, x, P(d))
    ups = sharding.shard_weight(up, mesh, "column", "model")
    downs = sharding.shard_weight(down, mesh, "row", "model")
    f = jax.jit(mlp)
    y = f(xs, ups, downs)
    ref = mlp(x, up, down)
    assert util.rel_err(y, ref) <= util.TOLERANCE[np.dtype(x.dtype)]
    assert collectives(f, xs, ups, downs) == [("all-reduce", "f16", local_shape(y))]


def test_eager_call_on_sharded_arrays(mesh, kind, util):
    x, qw = problem(util, kind=kind)
    y = jm.marlin_matmul(put(mesh, x, P()), sharding.shard_weight(qw, mesh, "column", "model"))
    assert_spec(y, P(None, None, "model"))
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, qw))


def test_vmap_under_sharding(mesh, kind, util):
    x, qw = problem(util, kind=kind)
    d = data_axis(mesh)
    xs = put(mesh, x, P(d))
    qs = sharding.shard_weight(qw, mesh, "column", "model")
    f = jax.jit(jax.vmap(jm.marlin_matmul, in_axes=(0, None)))
    np.testing.assert_array_equal(f(xs, qs), jm.marlin_matmul(x, qw))
    assert collectives(f, xs, qs) == []


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
def test_unusable_split_raises(n, group_size, mode, match, kind, util):
    mesh = _eight()
    x, qw = problem(util, group_size, n=n, kind=kind)
    # Up front, from the helper that builds shardings ...
    with pytest.raises(ValueError, match=match):
        sharding.weight_shardings(mesh, qw, mode, "model")
    # ... and from the partitioner when the codes (packed, or values and meta)
    # are split by hand (scales replicated: there are fewer scale rows than devices).
    qs = put_leaves(mesh, qw, sharding.weight_specs(qw, mode, "model"), scales=P())
    with pytest.raises(Exception, match=match):
        jax.jit(jm.marlin_matmul)(put(mesh, x, P()), qs)


def test_packed_and_scales_split_differently_raises(util):
    mesh = _eight()
    x, qw = problem(util, 64)
    qs = jm.QuantizedWeight(packed=put(mesh, qw.packed, P(None, "model")),
                            scales=put(mesh, qw.scales, P("model", None)))
    with pytest.raises(Exception, match="along both K and N"):
        jax.jit(jm.marlin_matmul)(put(mesh, x, P()), qs)


def test_hlo_check_sees_a_weight_all_gather(util):
    """The collectives() parser does report an all-gather of the packed weight."""
    mesh = _eight()
    _, qw = problem(util)
    qs = sharding.shard_weight(qw, mesh, "column", "model")
    gather = jax.jit(lambda p: jax.lax.with_sharding_constraint(p, NamedSharding(mesh, P())) + 1)
    assert ("all-gather", "s32", qw.packed.shape) in collectives(gather, qs.packed)


# --- shard_map: the kernel per shard, collectives written by hand -----------------


def test_shard_map_column(mesh, kind, util):
    x, qw = problem(util, kind=kind)
    d = data_axis(mesh)
    f = jax.jit(jax.shard_map(
        jm.marlin_matmul, mesh=mesh,
        in_specs=(P(d), sharding.weight_specs(qw, "column", "model")),
        out_specs=P(d, None, "model"),
    ))
    qs = sharding.shard_weight(qw, mesh, "column", "model")
    xs = put(mesh, x, P(d))
    np.testing.assert_array_equal(f(xs, qs), jm.marlin_matmul(x, qw))
    assert collectives(f, xs, qs) == []


@pytest.mark.parametrize("group_size", [64, None], ids=["g64", "per_channel"])
@pytest.mark.parametrize("scatter", [None, 2], ids=["psum", "psum_scatter"])
def test_shard_map_row(mesh, group_size, scatter, kind, util):
    x, qw = problem(util, group_size, kind=kind)
    d = data_axis(mesh)
    g = qw.group_size

    def row(x, qw):
        return sharding.row_parallel_matmul(x, qw, "model", group_size=g,
                                            scatter_dimension=scatter)

    out = P(d) if scatter is None else P(d, None, "model")
    f = jax.jit(jax.shard_map(
        row, mesh=mesh,
        in_specs=(P(d, None, "model"), sharding.weight_specs(qw, "row", "model")),
        out_specs=out,
    ))
    xs = put(mesh, x, P(d, None, "model"))
    qs = sharding.shard_weight(qw, mesh, "row", "model")
    y = f(xs, qs)
    util.assert_close(y, x, qw)
    op = "all-reduce" if scatter is None else "reduce-scatter"
    assert collectives(f, xs, qs) == [(op, "f16", local_shape(y))]


def test_shard_map_row_wrong_group_size_raises(util):
    mesh = _eight()
    x, qw = problem(util, 64)
    f = jax.shard_map(
        lambda x, qw: sharding.row_parallel_matmul(x, qw, "model", group_size=128),
        mesh=mesh, in_specs=(P(None, None, "model"), sharding.weight_specs(qw, "row", "model")),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="group_size=128 does not fit"):
        f(x, qw)


def test_shard_map_partly_manual_raises(util):
    """Only some mesh axes manual: refused (XLA would be free to gather the weight)."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    x, qw = problem(util)
    f = jax.shard_map(jm.marlin_matmul, mesh=mesh, axis_names={"data"},
                      in_specs=(P("data"), sharding.weight_specs(qw, "replicated")),
                      out_specs=P("data"))
    with pytest.raises(NotImplementedError, match="only mesh axes \\['data'\\] manual"):
        jax.jit(f)(x, qw)


# --- a QuantDense MLP block placed by its logical axis names --------------------


def test_quantdense_mlp_block(mesh, kind, util):
    """A Llama MLP block of jm.QuantDense layers (sparsity="2:4" for the sparse
    kind; gate/up column parallel, down row parallel, as LLAMA_PROJECTIONS
    names them), its parameters placed by those names under
    LOGICAL_AXIS_RULES: equal to one device's, with one all-reduce of the
    output and nothing else."""
    nnx = pytest.importorskip("flax.nnx")
    from jax_marlin.models import llama

    F = 1024
    sparsity = {"dense": None, "sparse": "2:4"}[kind]

    class Block(nnx.Module):
        def __init__(self, rngs):
            def proj(name, k, n):
                init = nnx.with_partitioning(nnx.initializers.normal(0.05),
                                             sharding.LLAMA_PROJECTIONS[name])
                return jm.QuantDense(k, n, use_bias=False, group_size=64, kernel_init=init,
                                     param_dtype=jnp.float16, sparsity=sparsity, rngs=rngs)
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
    # The names did their job: gate/up split on N, down on K, over "model"
    # (every leaf of the sparse weight: values, meta and scales).
    leaves = {"dense": ("packed",), "sparse": ("values", "meta", "scales")}[kind]
    for leaf in leaves:
        assert placed["gate"][leaf].sharding.spec == P(None, "model"), leaf
        assert placed["up"][leaf].sharding.spec == P(None, "model"), leaf
        assert placed["down"][leaf].sharding.spec == P("model", None), leaf
    xs = put(mesh, x, P(data_axis(mesh)))
    f = jax.jit(run)
    y = f(placed, xs)
    assert util.rel_err(y, ref) <= util.TOLERANCE[np.dtype(x.dtype)]
    assert collectives(f, placed, xs) == [("all-reduce", "f16", local_shape(y))]
