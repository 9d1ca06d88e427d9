"""Sparse (2:4) marlin_matmul on 8 devices (run by tests/test_sparse.py in a child process).

Data parallel with a replicated weight works; a weight sharded along K or N
raises NotImplementedError (issue 8 TODO) instead of being all-gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_marlin as jm

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


@pytest.fixture(params=["shardy", "gspmd"], autouse=True)
def partitioner(request):
    old = jax.config.jax_use_shardy_partitioner
    jax.config.update("jax_use_shardy_partitioner", request.param == "shardy")
    yield
    jax.config.update("jax_use_shardy_partitioner", old)


@pytest.fixture
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _weight():
    rng = np.random.default_rng(0)
    return jm.quantize_sparse(rng.standard_normal((256, 256)).astype(np.float32), 64)


def test_data_parallel_replicated_weight(mesh):
    sqw = _weight()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 4, 256)), jnp.float16)
    want = np.asarray(jm.marlin_matmul(x, sqw), np.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ws = jax.device_put(sqw, NamedSharding(mesh, P()))
    y = jax.jit(jm.marlin_matmul)(xs, ws)
    np.testing.assert_array_equal(np.asarray(y, np.float32), want)


@pytest.mark.parametrize("spec", [P(None, "model"), P("model", None)], ids=["column", "row"])
def test_sharded_sparse_weight_is_refused(mesh, spec):
    sqw = _weight()
    x = jnp.ones((8, 256), jnp.float16)
    ws = jax.device_put(sqw, NamedSharding(mesh, spec))
    # XLA's partitioner wraps the callback's NotImplementedError; the message stays.
    with pytest.raises((NotImplementedError, jax.errors.JaxRuntimeError),
                       match="NotImplementedError: marlin_matmul: sharded 2:4 sparse weights"):
        jax.jit(jm.marlin_matmul)(x, ws).block_until_ready()
