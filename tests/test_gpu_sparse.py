"""2:4 sparse weights on the GPU (marked `gpu`: skipped without a GPU).

The CUDA path is the mma.sp kernel (issue 8, csrc/cuda/sparse_kernel.cuh);
tests/cuda/sparse_selftest.cu checks it without JAX, at more shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm

pytestmark = pytest.mark.gpu

LLAMA_SHAPES = [(4096, 12288), (11008, 4096), (8192, 28672)]
TOLERANCE = {np.dtype(jnp.float16): 2e-3, np.dtype(jnp.bfloat16): 1e-2}


@functools.cache
def sparse_weight(K, N, g, dtype):
    """A quantized 2:4 weight and its dense float32 twin, made once per shape on the
    GPU by one jitted program (eager quantization compiles every op separately)."""
    w = jax.random.normal(jax.random.key(K + 7 * N), (K, N), jnp.float32) * 0.02
    sqw = jax.jit(jm.quantize_sparse, static_argnums=1, static_argnames="dtype")(w, g, dtype=dtype)
    return sqw, jm.dequantize(sqw).astype(jnp.float32)


def check_every_m(K, N, g, dtype, ms):
    """marlin_matmul against a float32 product with the dequantized weight, at each M;
    the second call must be bit-identical (the cross-block reduction has a fixed order)."""
    sqw, w = sparse_weight(K, N, g, dtype)
    f = jax.jit(jm.marlin_matmul)
    for M in ms:
        x = jax.random.normal(jax.random.key(M), (M, K), jnp.float32).astype(dtype)
        y = f(x, sqw)
        assert next(iter(y.devices())).platform == "gpu"
        ref = jnp.matmul(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        assert err <= TOLERANCE[np.dtype(dtype)], (M, err)
        assert np.array_equal(np.asarray(f(x, sqw)), np.asarray(y)), M


@pytest.mark.parametrize("K,N", LLAMA_SHAPES)
@pytest.mark.parametrize("dtype,g", [(jnp.float16, 128), (jnp.bfloat16, None)])
def test_sparse_matmul_at_llama_shapes(K, N, dtype, g):
    check_every_m(K, N, g, dtype, [1, 16, 33, 1000])


def test_sparse_kernel_is_called():
    sqw = jm.quantize_sparse(jnp.ones((128, 64), jnp.float32), 64, dtype=jnp.float16)
    x = jnp.ones((3, 128), jnp.float16)
    text = jax.jit(jm.marlin_matmul).lower(x, sqw).as_text()
    assert "jax_marlin_sparse_matmul" in text


@pytest.mark.parametrize("K,N", [(256, 192), (1024, 768), (4096, 512)])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("g", [32, 64, 128, None])
def test_sparse_kernel_every_group_and_m(K, N, dtype, g):
    check_every_m(K, N, g, dtype, [1, 7, 16, 33, 64, 100])


@pytest.mark.parametrize("K,N,M", [(28672, 8192, 128), (8192, 8192, 128), (4096, 12288, 200)])
def test_sparse_kernel_itself_through_the_prefill_kernel(K, N, M):
    """From 64 rows on, sparse_matmul may hand the product to the prefill
    kernel's 2:4 form (csrc/cuda/prefill_kernel.cuh): on 132 SMs these three
    take it, the first two with K split over 4 and 2 blocks a tile. The
    kernel's own path (no dispatch table), against the dequantized weight,
    bit-identical when run again."""
    from jax_marlin import ops

    sqw, w = sparse_weight(K, N, 128, jnp.float16)
    x = jax.random.normal(jax.random.key(M + K), (M, K), jnp.float32).astype(jnp.float16)
    call = jax.jit(ops._sparse_kernel_call)
    y = call(x, sqw.values, sqw.meta, sqw.scales)
    ref = jnp.matmul(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err <= TOLERANCE[np.dtype(jnp.float16)], err
    assert np.array_equal(np.asarray(call(x, sqw.values, sqw.meta, sqw.scales)), np.asarray(y))
