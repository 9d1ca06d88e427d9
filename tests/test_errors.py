"""Bad inputs give a ValueError/TypeError that says what is wrong, never a crash."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm
from jax_marlin import layout

K, N = 128, 64


def _codes(k=K, n=N, dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 16, (k, n)).astype(dtype)


def _scales(rows=1, n=N, dtype=np.float16):
    return np.full((rows, n), 0.01, dtype)


@pytest.fixture(scope="module")
def qw():
    return jm.pack(_codes(), _scales(rows=K // 32))


# --- pack ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "codes, scales, error, match",
    [
        (_codes(dtype=np.float32), _scales(), TypeError, "integer array"),
        (_codes(dtype=bool), _scales(), TypeError, "integer array"),
        (_codes(), _scales(dtype=np.float32), TypeError, "float16 or bfloat16"),
        (_codes(), _scales().astype(np.int32), TypeError, "float16 or bfloat16"),
        (_codes()[0], _scales(), ValueError, "2-D"),
        (_codes(), _scales()[0], ValueError, "2-D"),
        (_codes(k=96), _scales(), ValueError, "K = 96 is not a multiple of 64"),
        (_codes(n=96), _scales(n=96), ValueError, "N = 96 is not a multiple of 64"),
        (_codes(), _scales(n=128), ValueError, "128 columns but the weight has N = 64"),
        (_codes(), _scales(rows=3), ValueError, "3 rows, which does not divide K = 128"),
        (_codes(), _scales(rows=8), ValueError, "group size 16 is not supported"),
    ],
)
def test_pack_rejects(codes, scales, error, match):
    with pytest.raises(error, match=match):
        jm.pack(codes, scales)


@pytest.mark.parametrize("bad", [16, 255, -1])
def test_pack_rejects_codes_out_of_range(bad):
    codes = _codes(dtype=np.int32)
    codes[3, 5] = bad
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.15"):
        jm.pack(codes, _scales())


def test_pack_under_jit_masks_instead_of_checking():
    # Traced codes cannot be range-checked; they are masked to 4 bits so a bad
    # value cannot corrupt its neighbours.
    codes = _codes()
    bad = codes.copy()
    bad[0, 0] = 16 + codes[0, 0]
    a = jax.jit(jm.pack)(bad, _scales())
    b = jm.pack(codes, _scales())
    np.testing.assert_array_equal(a.packed, b.packed)


# --- quantize -------------------------------------------------------------------


@pytest.mark.parametrize(
    "w, kwargs, error, match",
    [
        (np.ones((K, N), np.int32), {}, TypeError, "float array"),
        (np.ones((K,), np.float32), {}, ValueError, "2-D"),
        (np.ones((K, N), np.float32), {"group_size": 16}, ValueError, "group_size must be one of"),
        (np.ones((256, N), np.float32), {"group_size": 256}, ValueError, "or None"),
        (np.ones((K, N), np.float32), {"dtype": jnp.float32}, TypeError, "float16 or bfloat16"),
        (np.ones((96, N), np.float32), {"group_size": 32}, ValueError, "not a multiple of 64"),
        (np.ones((K, 100), np.float32), {}, ValueError, "N = 100 is not a multiple of 64"),
        (np.ones((64, N), np.float32), {"group_size": 128}, ValueError, "does not divide K = 64"),
    ],
)
def test_quantize_rejects(w, kwargs, error, match):
    with pytest.raises(error, match=match):
        jm.quantize(w, **kwargs)


# --- QuantizedWeight ------------------------------------------------------------


@pytest.mark.parametrize(
    "packed, scales, error, match",
    [
        (np.zeros((8, 128), np.uint32), _scales(), TypeError, "packed must be int32"),
        (np.zeros((8, 128), np.float32), _scales(), TypeError, "packed must be int32"),
        (np.zeros((8, 128), np.int32), _scales(dtype=np.float32), TypeError, "float16 or bfloat16"),
        (np.zeros((128,), np.int32), _scales(), ValueError, r"\(K // 16, 2 \* N\)"),
        (np.zeros((8, 127), np.int32), _scales(), ValueError, r"\(K // 16, 2 \* N\)"),
        (np.zeros((8, 128), np.int32), _scales()[0], ValueError, "must both be 2-D"),
        (np.zeros((2, 8, 128), np.int32), _scales(), ValueError, "share their leading"),
        (np.zeros((8, 128), np.int32), _scales(n=128), ValueError, "columns but the weight has N = 64"),
        (np.zeros((8, 128), np.int32), _scales(rows=3), ValueError, "does not divide K = 128"),
        (np.zeros((6, 128), np.int32), _scales(), ValueError, "K = 96 is not a multiple of 64"),
        (np.zeros((8, 96), np.int32), _scales(n=48), ValueError, "N = 48 is not a multiple of 64"),
        (np.zeros((8, 128), np.int32), _scales(rows=8), ValueError, "group size 16"),
    ],
)
def test_quantized_weight_rejects(packed, scales, error, match):
    with pytest.raises(error, match=match):
        jm.QuantizedWeight(packed=packed, scales=scales)


def test_quantized_weight_astype_rejects_float32(qw):
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        qw.astype(jnp.float32)


def test_quantized_weight_allows_non_array_leaves():
    # What pytree utilities build: None, sentinels, vmap in_axes specs.
    for leaf in (None, object(), 0):
        jm.QuantizedWeight(packed=leaf, scales=leaf)


# --- marlin_matmul --------------------------------------------------------------


def test_matmul_rejects_float32_x(qw):
    with pytest.raises(TypeError, match="x must be float16 or bfloat16, got float32"):
        jm.marlin_matmul(np.ones((2, K), np.float32), qw)


def test_matmul_rejects_dtype_mismatch(qw):
    with pytest.raises(TypeError, match=r"qw\.astype\(x\.dtype\)"):
        jm.marlin_matmul(jnp.ones((2, K), jnp.bfloat16), qw)


@pytest.mark.parametrize("k", [K - 64, K + 64, 1])
def test_matmul_rejects_wrong_k(qw, k):
    with pytest.raises(ValueError, match=f"x's last dimension is {k} but the weight has K = {K}"):
        jm.marlin_matmul(jnp.ones((2, k), jnp.float16), qw)


def test_matmul_rejects_scalar_x(qw):
    with pytest.raises(ValueError, match="at least 1 dimension"):
        jm.marlin_matmul(jnp.float16(1), qw)


def test_matmul_rejects_non_quantized_weight():
    with pytest.raises(TypeError, match="must be a jax_marlin.QuantizedWeight"):
        jm.marlin_matmul(jnp.ones((2, K), jnp.float16), jnp.ones((K, N), jnp.float16))


def test_matmul_rejects_stacked_weight(qw):
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), qw)
    with pytest.raises(ValueError, match="stack of weights"):
        jm.marlin_matmul(jnp.ones((2, K), jnp.float16), stacked)


def test_matmul_errors_under_jit(qw):
    # Checks run at trace time, so they fire under jit too.
    with pytest.raises(TypeError, match=r"qw\.astype\(x\.dtype\)"):
        jax.jit(jm.marlin_matmul)(jnp.ones((2, K), jnp.bfloat16), qw)
    with pytest.raises(ValueError, match="last dimension"):
        jax.jit(jm.marlin_matmul)(jnp.ones((2, 64), jnp.float16), qw)


def test_check_shape_messages_say_what_to_change():
    with pytest.raises(ValueError, match="Pad .* to 128"):
        layout.check_shape(100, 64, 100)
    with pytest.raises(ValueError, match="Pad .* to 192"):
        layout.check_shape(64, 130, 64)
    with pytest.raises(ValueError, match=r"use one of \(32, 64, 128\)"):
        layout.check_shape(256, 64, 16)


def test_matmul_without_kernel_for_platform(qw, monkeypatch):
    # As on a GPU machine with a CPU-only build: a clear error, not a lowering failure.
    from jax_marlin import _ffi

    monkeypatch.setattr(_ffi, "BACKENDS", frozenset({"cuda"}))
    cpu = jax.devices("cpu")[0]  # x on the CPU, whatever the default backend
    x = jax.device_put(jnp.ones((2, K), jnp.float16), cpu)
    with pytest.raises(RuntimeError, match=r"no jax_marlin kernel for platform 'cpu'"):
        jm.marlin_matmul(x, jax.device_put(qw, cpu))
