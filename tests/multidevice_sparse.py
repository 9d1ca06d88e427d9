"""Sharded 2:4 sparse marlin_matmul on 8 devices (run by tests/test_sparse.py in a child process).

The sparse weight (values, meta, scales) is split by the same rules as the
dense one: data, column and row parallel and their combinations with a data
axis, on meshes (8,), (2, 4) and (4, 2), under Shardy and GSPMD; no leaf of
the weight is ever all-gathered, and row parallel needs exactly one
all-reduce (or reduce-scatter) of the output. Splits the layout cannot take
raise. The tests that the dense weight shares run for both kinds in
tests/multidevice_sharding.py (its ``kind`` fixture); this file holds the
sparse-only ones.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from multidevice_sharding import (  # noqa: F401  (fixtures: partitioner)
    assert_spec,
    close_to_one_device,
    collectives,
    local_shape,
    partitioner,
    put,
    put_leaves,
)
from multidevice_sharding import problem as _problem

import jax_marlin as jm
from jax_marlin import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def problem(util, group_size=64, **kw):
    return _problem(util, group_size, kind="sparse", **kw)


def _eight():
    return Mesh(np.array(jax.devices()[:8]), ("model",))


def _two_by_four():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def test_2d_weight(util):
    """K over "data", N over "model" (both split): the row all-reduce over "data" only."""
    mesh = _two_by_four()
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


# --- unusable shardings: clear errors, no silent weight all-gather ---------------


def test_rows_not_whole_tiles_raise(util):
    """32-row shards: whole bands of the sparse layout, but not the kernel's 64-row tile."""
    mesh = _two_by_four()
    x, sqw = problem(util, None)
    small = jm.SparseQuantizedWeight(values=sqw.values[:4], meta=sqw.meta[:4],
                                     scales=sqw.scales)  # K = 128, per-channel: 4 x 32 rows
    with pytest.raises(ValueError, match="multiples of 64 input rows"):
        sharding.weight_shardings(mesh, small, "row", "model")
    ws = put_leaves(mesh, small, sharding.weight_specs(small, "row", "model"))
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
    mesh2 = _two_by_four()
    ws = jm.SparseQuantizedWeight(values=put(mesh2, sqw.values, P(None, "model")),
                                  meta=put(mesh2, sqw.meta, P(None, "data")),
                                  scales=put(mesh2, sqw.scales, P()))
    with pytest.raises(Exception, match="leaves are sharded differently along N"):
        jax.jit(jm.marlin_matmul)(put(mesh2, x, P()), ws)
