"""GPTQ in JAX: reduces to RTN for a diagonal Hessian, matches a plain reference,
beats RTN on correlated inputs, handles degenerate Hessians, rejects bad input."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm
from jax_marlin.gptq import gptq_quantize, hessian


def correlated_inputs(seed, n, K):
    """Activations with a few dominant directions and uneven channel scales, like real layers."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, K))
    x = rng.standard_normal((n, 16)) @ basis + 0.3 * rng.standard_normal((n, K))
    return (x * rng.uniform(0.2, 3.0, K)).astype(np.float32)


def output_error(x, w, qw):
    w_hat = np.asarray(jm.dequantize(qw), np.float64)
    return np.linalg.norm(x @ (w_hat - w)) / np.linalg.norm(x @ w)


def gptq_reference(w, h, g, damp=0.01, dtype=np.float16):
    """Textbook GPTQ, unblocked, in float64 numpy (rows of w = inputs): codes and scales."""
    K, N = w.shape
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    h[np.diag_indices(K)] += np.where(np.diag(h) == 0, 1.0, 0.0)
    h += damp * np.mean(np.diag(h)) * np.eye(K)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((K, N), np.uint8)
    scales = np.zeros((K // g, N), dtype)
    for k in range(K):
        if k % g == 0:
            s = np.max(np.abs(w[k : k + g]), axis=0) / 7
            s = s.astype(dtype)
            s[s == 0] = 1
            scales[k // g] = s
        s = scales[k // g].astype(np.float64)
        q = np.clip(np.round(w[k] / s) + 8, 0, 15)
        codes[k] = q
        err = (w[k] - (q - 8) * s) / u[k, k]
        w[k:] -= np.outer(u[k, k:], err)
    return codes, scales


@pytest.mark.parametrize(
    "group_size, dtype",
    [(32, jnp.float16), (64, jnp.bfloat16), (128, jnp.float16), (None, jnp.float16), (None, jnp.bfloat16)],
)
def test_diagonal_hessian_is_exactly_rtn(group_size, dtype):
    # No correlations between inputs -> nothing to compensate: GPTQ == quantize().
    rng = np.random.default_rng(0)
    K, N = 256, 128
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    h = np.diag(rng.uniform(0.5, 2.0, K)).astype(np.float32)
    got = gptq_quantize(w, h, group_size, dtype=dtype)
    want = jm.quantize(w, group_size, dtype=dtype)
    np.testing.assert_array_equal(np.asarray(got.packed), np.asarray(want.packed))
    np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))


@pytest.mark.parametrize("group_size", [64, None])
def test_matches_unblocked_reference(group_size):
    K, N = 256, 128
    x = correlated_inputs(1, 512, K)
    w = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32) * 0.05
    h = np.asarray(hessian(x))
    codes, scales = jm.unpack(gptq_quantize(w, h, group_size, block_size=128))
    ref_codes, ref_scales = gptq_reference(w, h, K if group_size is None else group_size)
    # float32 blocked vs float64 unblocked: a rare rounding tie may go the other way.
    assert np.mean(np.asarray(codes) == ref_codes) > 0.99
    np.testing.assert_allclose(np.asarray(scales, np.float32), ref_scales.astype(np.float32), rtol=2e-2)


def test_block_size_does_not_change_the_result():
    K, N = 256, 128
    x = correlated_inputs(3, 512, K)
    w = np.random.default_rng(4).standard_normal((K, N)).astype(np.float32) * 0.05
    h = hessian(x)
    a, _ = jm.unpack(gptq_quantize(w, h, None, block_size=64))
    b, _ = jm.unpack(gptq_quantize(w, h, None, block_size=128))
    assert np.mean(np.asarray(a) == np.asarray(b)) > 0.99


@pytest.mark.parametrize("group_size", [128, None])
def test_beats_rtn_on_correlated_inputs(group_size):
    K, N = 256, 128
    x = correlated_inputs(5, 1024, K)
    w = np.random.default_rng(6).standard_normal((K, N)).astype(np.float32) * 0.05
    gptq = gptq_quantize(w, hessian(x), group_size)
    rtn = jm.quantize(w, group_size)
    held_out = correlated_inputs(5, 2048, K)[1024:]  # same distribution, unseen rows
    e_gptq, e_rtn = output_error(held_out, w, gptq), output_error(held_out, w, rtn)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_dead_inputs_and_zero_groups():
    K, N = 256, 128
    x = correlated_inputs(7, 256, K)
    x[:, :10] = 0  # inputs that are always zero: a singular Hessian without the fix
    w = np.random.default_rng(8).standard_normal((K, N)).astype(np.float32)
    w[:32, :5] = 0  # an all-zero group gets scale 1, like quantize()
    qw = gptq_quantize(w, hessian(x), 32, damp=0.0)
    codes, scales = jm.unpack(qw)
    assert np.all(np.isfinite(np.asarray(scales, np.float32)))
    assert np.all(np.asarray(scales)[0, :5] == 1)


def test_bad_input():
    w = np.zeros((128, 64), np.float32)
    h = np.eye(128, dtype=np.float32)
    with pytest.raises(ValueError, match=r"Hessian must be \(K, K\) = \(128, 128\)"):
        gptq_quantize(w, np.eye(64), 128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        gptq_quantize(w, h, 100)
    with pytest.raises(ValueError, match="damp must be >= 0"):
        gptq_quantize(w, h, 128, damp=-1.0)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        gptq_quantize(w, h, 128, dtype=jnp.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        gptq_quantize(np.zeros((128, 100), np.float32), h, 128)
    with pytest.raises(ValueError, match="2-D float"):
        gptq_quantize(np.zeros((128, 64), np.int32), h, 128)
    with pytest.raises(ValueError, match="not positive definite.*increase damp"):
        gptq_quantize(np.ones((256, 128), np.float32), -np.eye(256, dtype=np.float32), None, damp=0.0)
