"""marlin_matmul on the default backend against the float32 reference."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jax_marlin as jm
from jax_marlin import layout
from jax_marlin.ops import marlin_matmul_reference

DTYPES = [jnp.float16, jnp.bfloat16]


@pytest.fixture(scope="module")
def weight(util):
    """A (256, 192) group-64 weight and matching x, both float16."""
    return util.random_weight(0, 256, 192, 64, jnp.float16), util.random_x(1, (5, 256), jnp.float16)


def test_backends():
    assert "cpu" in jm.backends()
    assert jm.backends() <= {"cpu", "cuda"}


def test_golden(golden, util):
    qw = jm.QuantizedWeight(packed=golden["packed_weights"], scales=golden["packed_scales"])
    y = jm.marlin_matmul(golden["a"], qw)
    assert y.shape == golden["c_ref"].shape and y.dtype == jnp.float16
    assert util.rel_err(y, golden["c_ref"]) <= 2e-3


@st.composite
def problems(draw):
    K = 64 * draw(st.integers(1, 32))
    N = 64 * draw(st.integers(1, 32))
    groups = [g for g in layout.GROUP_SIZES if K % g == 0] + [None]
    return (
        draw(st.integers(1, 300)),
        K,
        N,
        draw(st.sampled_from(groups)),
        draw(st.sampled_from(DTYPES)),
        draw(st.integers(0, 2**31 - 1)),
    )


@given(problem=problems())
def test_matches_reference(problem, util):
    M, K, N, g, dtype, seed = problem
    qw = util.random_weight(seed, K, N, g, dtype)
    x = util.random_x(seed + 1, (M, K), dtype)
    util.assert_close(jm.marlin_matmul(x, qw), x, qw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_function(dtype, util):
    qw = util.random_weight(2, 128, 64, 32, dtype)
    x = util.random_x(3, (3, 128), dtype)
    ref = marlin_matmul_reference(x, qw)
    assert ref.dtype == dtype
    assert util.rel_err(ref, util.reference_f32(x, qw)) <= util.TOLERANCE[np.dtype(dtype)]
    util.assert_close(jm.marlin_matmul(x, qw), x, qw)


@pytest.mark.parametrize("lead", [(), (1,), (2, 3), (4, 1, 2)])
def test_leading_dims_fold_into_m(lead, weight, util):
    qw, _ = weight
    x = util.random_x(4, (*lead, 256), jnp.float16)
    y = jm.marlin_matmul(x, qw)
    assert y.shape == (*lead, 192)
    folded = jm.marlin_matmul(x.reshape(-1, 256), qw).reshape(*lead, 192)
    np.testing.assert_array_equal(y, folded)  # literally the same kernel call
    util.assert_close(y, x, qw)


@pytest.mark.parametrize("shape", [(0, 256), (2, 0, 256)])
def test_empty_m(shape, weight):
    qw, _ = weight
    y = jm.marlin_matmul(jnp.ones(shape, jnp.float16), qw)
    assert y.shape == shape[:-1] + (192,) and y.dtype == jnp.float16


def test_jit_matches_eager(weight):
    qw, x = weight
    np.testing.assert_array_equal(jax.jit(jm.marlin_matmul)(x, qw), jm.marlin_matmul(x, qw))


def test_numpy_inputs(weight, util):
    qw, x = weight
    qw_np = jm.QuantizedWeight(packed=np.asarray(qw.packed), scales=np.asarray(qw.scales))
    y = jm.marlin_matmul(np.asarray(x), qw_np)
    np.testing.assert_array_equal(y, jm.marlin_matmul(x, qw))


def test_vmap_over_x_folds_into_one_call(weight, util):
    qw, _ = weight
    xb = util.random_x(5, (4, 5, 256), jnp.float16)
    f = jax.vmap(jm.marlin_matmul, in_axes=(0, None))
    y = f(xb, qw)
    assert y.shape == (4, 5, 192)
    # vmap folds the batch into M: the same as one call with leading dims.
    np.testing.assert_array_equal(y, jm.marlin_matmul(xb, qw))
    for i in range(4):
        util.assert_close(y[i], xb[i], qw)
    # Batch axis not in front, nested vmap, and vmap under jit.
    y1 = jax.vmap(jm.marlin_matmul, in_axes=(1, None), out_axes=1)(xb.transpose(1, 0, 2), qw)
    np.testing.assert_array_equal(y1, y.transpose(1, 0, 2))
    y2 = jax.jit(jax.vmap(jax.vmap(jm.marlin_matmul, in_axes=(0, None)), in_axes=(0, None)))(
        xb.reshape(2, 2, 5, 256), qw
    )
    np.testing.assert_array_equal(y2, y.reshape(2, 2, 5, 192))


def test_vmap_over_weight_raises(util):
    stacked = util.stack([util.random_weight(6 + i, 128, 64, 64, jnp.float16) for i in range(3)])
    x = util.random_x(9, (2, 128), jnp.float16)
    with pytest.raises(NotImplementedError, match="jax.lax.map"):
        jax.vmap(jm.marlin_matmul, in_axes=(None, 0))(x, stacked)
    # The way the message suggests works, one weight at a time.
    ys = jax.lax.map(lambda qw: jm.marlin_matmul(x, qw), stacked)
    for i in range(3):
        w_i = jax.tree_util.tree_map(lambda a: a[i], stacked)
        np.testing.assert_array_equal(ys[i], jm.marlin_matmul(x, w_i))


def test_non_contiguous_x(util):
    qw = util.random_weight(10, 128, 128, 32, jnp.bfloat16)
    big = util.random_x(11, (12, 256), jnp.bfloat16)
    views = {
        "transpose twice": big[:, :128].T.T,
        "strided rows": big[::3, :128],
        "column slice": big[:, 64:192],
        "transposed source": big.T[:128].T,
        "reversed rows": big[::-1, 128:],
    }
    for name, x in views.items():
        y = jm.marlin_matmul(x, qw)
        dense = jm.marlin_matmul(jnp.array(np.ascontiguousarray(x)), qw)
        np.testing.assert_array_equal(y, dense, err_msg=name)
        util.assert_close(y, x, qw)


def test_weight_as_jit_argument_and_device_put(weight):
    qw, x = weight
    f = jax.jit(lambda x, qw: jm.marlin_matmul(x, qw) * 2)
    expected = jm.marlin_matmul(x, qw) * 2
    np.testing.assert_array_equal(f(x, qw), expected)
    qw_dev = jax.device_put(qw, jax.devices()[0])
    assert isinstance(qw_dev, jm.QuantizedWeight)
    np.testing.assert_array_equal(f(x, qw_dev), expected)
    # Returned from jit, too.
    qw_out = jax.jit(lambda q: q)(qw)
    assert isinstance(qw_out, jm.QuantizedWeight) and qw_out.shape == qw.shape


def test_checkpoint_round_trip(weight, tmp_path):
    qw, x = weight
    # Plain pytree ops: save the leaves, rebuild with the treedef.
    leaves, treedef = jax.tree_util.tree_flatten({"layer": qw})
    np.savez(tmp_path / "ckpt.npz", *[np.asarray(a) for a in leaves])
    with np.load(tmp_path / "ckpt.npz") as f:
        restored = jax.tree_util.tree_unflatten(treedef, [f[k] for k in f.files])
    np.testing.assert_array_equal(jm.marlin_matmul(x, restored["layer"]), jm.marlin_matmul(x, qw))
    # flax msgpack serialization.
    serialization = pytest.importorskip("flax.serialization")
    blob = serialization.to_bytes({"layer": qw})
    restored = serialization.from_bytes({"layer": qw}, blob)["layer"]
    assert isinstance(restored, jm.QuantizedWeight)
    np.testing.assert_array_equal(jm.marlin_matmul(x, restored), jm.marlin_matmul(x, qw))


def test_astype_for_other_activation_dtype(weight, util):
    qw, x = weight
    qw_bf16 = qw.astype(jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    y = jm.marlin_matmul(xb, qw_bf16)
    assert y.dtype == jnp.bfloat16
    util.assert_close(y, xb, qw_bf16)


def test_scan_over_layers(util):
    """A stack of square weights applied layer by layer with lax.scan."""
    stacked = util.stack([util.random_weight(12 + i, 128, 128, 128, jnp.float16) for i in range(3)])
    x = util.random_x(15, (4, 128), jnp.float16)

    def step(h, qw):
        return jm.marlin_matmul(h, qw), None

    y, _ = jax.jit(lambda x, w: jax.lax.scan(step, x, w))(x, stacked)
    h = x
    for i in range(3):
        h = jm.marlin_matmul(h, jax.tree_util.tree_map(lambda a: a[i], stacked))
    np.testing.assert_array_equal(y, h)


@pytest.mark.parametrize("group_size", [64, None])
def test_grad_matches_dequantized_reference(group_size, util):
    qw = util.random_weight(3, 256, 128, group_size, jnp.float16)
    x = util.random_x(4, (2, 3, 256), jnp.float16)

    def loss(fn):
        return lambda x, s: jnp.sum(fn(x, jm.QuantizedWeight(packed=qw.packed, scales=s)).astype(jnp.float32) ** 2)

    gx, gs = jax.jit(jax.grad(loss(jm.marlin_matmul), argnums=(0, 1)))(x, qw.scales)
    rx, rs = jax.grad(loss(marlin_matmul_reference), argnums=(0, 1))(x, qw.scales)
    assert gx.dtype == x.dtype and gs.dtype == qw.scales.dtype
    assert util.rel_err(gx, rx) < 5e-3
    assert util.rel_err(gs, rs) < 5e-3


def test_forward_mode_is_a_clear_error(weight):
    qw, x = weight
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: jm.marlin_matmul(x, qw), (x,), (x,))
