"""The packed layout (FORMAT.md): golden vectors bit for bit, round trips, quantize."""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import jax_marlin as jm
from jax_marlin import layout


def _bits(a):
    """Raw bits, so that comparisons are exact (and NaN-safe) for any dtype."""
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _group_size(golden):
    g = int(golden["groupsize"])
    return golden["codes"].shape[0] if g == -1 else g


def test_pack_matches_golden(golden):
    qw = jm.pack(golden["codes"], golden["scales"])
    np.testing.assert_array_equal(_bits(qw.packed), _bits(golden["packed_weights"]))
    np.testing.assert_array_equal(_bits(qw.scales), _bits(golden["packed_scales"]))
    assert qw.packed.dtype == jnp.int32 and qw.scales.dtype == jnp.float16
    assert qw.shape == golden["codes"].shape
    assert qw.group_size == _group_size(golden)
    assert qw.is_per_channel == (int(golden["groupsize"]) == -1)


def test_pack_matches_golden_under_jit(golden):
    qw = jax.jit(jm.pack)(jnp.asarray(golden["codes"]), jnp.asarray(golden["scales"]))
    np.testing.assert_array_equal(_bits(qw.packed), _bits(golden["packed_weights"]))
    np.testing.assert_array_equal(_bits(qw.scales), _bits(golden["packed_scales"]))


def test_unpack_inverts_golden(golden):
    qw = jm.QuantizedWeight(packed=golden["packed_weights"], scales=golden["packed_scales"])
    codes, scales = jm.unpack(qw)
    assert codes.dtype == jnp.uint8
    np.testing.assert_array_equal(codes, golden["codes"])
    np.testing.assert_array_equal(_bits(scales), _bits(golden["scales"]))


def test_dequantize_golden(golden):
    qw = jm.QuantizedWeight(packed=golden["packed_weights"], scales=golden["packed_scales"])
    g = _group_size(golden)
    s = np.repeat(golden["scales"].astype(np.float32), g, axis=0)
    expected = ((golden["codes"].astype(np.float32) - 8) * s).astype(np.float16)
    w_hat = jm.dequantize(qw)
    assert w_hat.dtype == jnp.float16
    np.testing.assert_array_equal(_bits(w_hat), _bits(expected))


def test_permutations_are_permutations():
    for perm, inv in [
        (layout.WEIGHT_PERM, layout.WEIGHT_PERM_INV),
        (layout.SCALE_PERM, layout.SCALE_PERM_INV),
        (layout.SCALE_PERM_CHANNEL, layout.SCALE_PERM_CHANNEL_INV),
    ]:
        np.testing.assert_array_equal(np.sort(perm), np.arange(perm.size))
        np.testing.assert_array_equal(perm[inv], np.arange(perm.size))
    assert layout.WEIGHT_PERM.size == 1024


def test_permutations_run_as_transposes():
    """The packers move data with transposes equal to the index arrays, so that the
    dequantize + dot path and on-device packing have no gathers."""
    from jax_marlin import sparse_layout

    pairs = [(layout.WEIGHT_RUN, layout.WEIGHT_PERM), (layout.SCALE_RUN, layout.SCALE_PERM),
             (layout.SCALE_RUN_CHANNEL, layout.SCALE_PERM_CHANNEL),
             (sparse_layout.VALUE_RUN, sparse_layout.VALUE_PERM),
             (sparse_layout.META_RUN, sparse_layout.META_PERM),
             (layout.GROUPED_TO_CHANNEL_RUN, layout.GROUPED_TO_CHANNEL)]
    for run, perm in pairs:
        np.testing.assert_array_equal(run.indices(), perm)
        np.testing.assert_array_equal(run.inverse().indices(), np.argsort(perm))
        np.testing.assert_array_equal(layout.RunTranspose.of(perm).indices(), perm)
    for not_bits in (np.array([0, 2, 1, 3, 5, 4, 6, 7]), np.arange(6), np.array([1, 0, 3, 2])):
        with pytest.raises(ValueError, match="index bits"):
            layout.RunTranspose.of(not_bits)
    qw = jm.pack(jnp.zeros((256, 128), jnp.uint8), jnp.ones((2, 128), jnp.float16))
    sqw = jm.quantize_sparse(jnp.ones((256, 128), jnp.float32), 128)
    for w in (qw, sqw):
        assert "gather" not in jax.jit(jm.dequantize).lower(w).as_text()


@st.composite
def weight_shapes(draw):
    """(K, N, group_size) with K, N multiples of 64 and a group size dividing K."""
    K = 64 * draw(st.integers(1, 12))
    N = 64 * draw(st.integers(1, 12))
    groups = [g for g in layout.GROUP_SIZES if K % g == 0] + [None]
    return K, N, draw(st.sampled_from(groups))


dtypes = st.sampled_from([jnp.float16, jnp.bfloat16])


@given(shape=weight_shapes(), dtype=dtypes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(shape, dtype, seed):
    K, N, g = shape
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (K, N), dtype=np.uint8)
    G = 1 if g is None else K // g
    scales = rng.uniform(-2, 2, (G, N)).astype(dtype)
    qw = jm.pack(codes, scales)
    assert qw.packed.shape == (K // 16, 2 * N) and qw.scales.shape == (G, N)
    assert qw.group_size == (K if g is None else g)
    c, s = jm.unpack(qw)
    np.testing.assert_array_equal(c, codes)
    np.testing.assert_array_equal(_bits(s), _bits(scales))
    # The same under jit, and re-wrapping the packed arrays is accepted.
    c2, s2 = jax.jit(jm.unpack)(jm.QuantizedWeight(packed=qw.packed, scales=qw.scales))
    np.testing.assert_array_equal(c2, codes)
    np.testing.assert_array_equal(_bits(s2), _bits(scales))


def test_pack_accepts_other_integer_dtypes():
    codes = np.random.default_rng(0).integers(0, 16, (64, 64))
    scales = np.ones((1, 64), np.float16)
    a = jm.pack(codes.astype(np.int32), scales)
    b = jm.pack(codes.astype(np.uint8), scales)
    np.testing.assert_array_equal(a.packed, b.packed)


def test_stacked_weights():
    """A stack of weights (tree_map stack / vmap(quantize)) unpacks and dequantizes per weight."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((3, 128, 64), np.float32))
    stacked = jax.vmap(lambda w: jm.quantize(w, 64))(w)
    assert stacked.packed.shape == (3, 8, 128) and stacked.shape == (128, 64)
    assert stacked.group_size == 64
    w_hat = jm.dequantize(stacked)
    for i in range(3):
        np.testing.assert_array_equal(_bits(w_hat[i]), _bits(jm.dequantize(jm.quantize(w[i], 64))))


@given(shape=weight_shapes(), dtype=dtypes, seed=st.integers(0, 2**31 - 1))
def test_quantize_error_bounded(shape, dtype, seed):
    K, N, g = shape
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * rng.uniform(0.01, 10)).astype(np.float32)
    qw = jm.quantize(w, group_size=g, dtype=dtype)
    assert qw.shape == (K, N) and qw.dtype == dtype
    assert qw.group_size == (K if g is None else g)
    codes, scales = jm.unpack(qw)
    codes = np.asarray(codes)
    s = np.repeat(np.asarray(scales, np.float32), qw.group_size, axis=0)
    w_hat = np.asarray(jm.dequantize(qw), np.float32)
    # Symmetric: the group's largest |w| maps to +-7, so codes stay in 1..15.
    assert codes.min() >= 1 and codes.max() <= 15
    # Round to nearest: half a step, plus the rounding of w_hat to dtype.
    eps = float(jnp.finfo(dtype).eps)
    assert np.all(np.abs(w - w_hat) <= s / 2 + np.abs(w_hat) * eps + 1e-30)
    # dequantize is (code - 8) * s rounded once to the scales' dtype.
    np.testing.assert_array_equal(
        _bits(w_hat.astype(dtype)), _bits(((codes.astype(np.float32) - 8) * s).astype(dtype))
    )


def test_quantize_dtype_rules():
    w32 = np.random.default_rng(1).standard_normal((128, 64)).astype(np.float32)
    assert jm.quantize(w32).dtype == jnp.float16  # default for float32 weights
    assert jm.quantize(w32.astype(jnp.bfloat16)).dtype == jnp.bfloat16  # w's own dtype
    assert jm.quantize(w32, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert jm.quantize(w32, group_size=None).is_per_channel


def test_quantize_zero_and_huge_groups_stay_finite():
    w = np.zeros((128, 64), np.float32)
    w[:, 1] = 1e9  # beyond float16: saturates
    w[:, 2] = -1e9
    w[:, 3] = 1e-5  # scale below float16's normal range: kept as a subnormal
    w_hat = np.asarray(jm.dequantize(jm.quantize(w, group_size=64)), np.float32)
    assert np.all(np.isfinite(w_hat))
    assert np.all(w_hat[:, 0] == 0)
    np.testing.assert_allclose(w_hat[:, 3], 1e-5, rtol=0.1)


def test_quantize_under_jit():
    w = jnp.asarray(np.random.default_rng(2).standard_normal((256, 128)), jnp.bfloat16)
    a = jax.jit(jm.quantize, static_argnames="group_size")(w, group_size=32)
    b = jm.quantize(w, group_size=32)
    np.testing.assert_array_equal(a.packed, b.packed)
    np.testing.assert_array_equal(_bits(a.scales), _bits(b.scales))


def test_astype_converts_scales_only():
    qw = jm.quantize(np.random.default_rng(3).standard_normal((128, 64)).astype(np.float16))
    bf = qw.astype(jnp.bfloat16)
    assert bf.dtype == jnp.bfloat16 and bf.packed is qw.packed
    np.testing.assert_array_equal(
        _bits(jm.unpack(bf)[1]), _bits(jm.unpack(qw)[1].astype(jnp.bfloat16))
    )


@pytest.mark.parametrize("g", [32, 64, 128, None])
def test_check_shape_accepts_supported(g):
    layout.check_shape(256, 128, 256 if g is None else g)


def test_layout_closed_forms_match_the_recipe():
    """The CUDA dequantize computes where each code and scale goes in closed
    form (marlin_layout.h); the CPU handler uses tables built from FORMAT.md's
    recipe. The two agree at every entry of a run."""
    from jax_marlin import _ffi

    assert _ffi._ext.layout_closed_forms_match()
