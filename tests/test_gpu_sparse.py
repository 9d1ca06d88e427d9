"""2:4 sparse weights on the GPU at Llama shapes (marked `gpu`: skipped without a GPU).

Until the Sparse-Marlin kernel lands (issue 8) the CUDA path is dequantize +
XLA dot; these tests pin its numbers so the kernel can replace it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_marlin as jm

pytestmark = pytest.mark.gpu

LLAMA_SHAPES = [(4096, 12288), (11008, 4096), (8192, 28672)]
TOLERANCE = {np.dtype(jnp.float16): 2e-3, np.dtype(jnp.bfloat16): 1e-2}


@pytest.mark.parametrize("K,N", LLAMA_SHAPES)
@pytest.mark.parametrize("M", [1, 16, 33, 1000])
@pytest.mark.parametrize("dtype,g", [(jnp.float16, 128), (jnp.bfloat16, None)])
def test_sparse_matmul_at_llama_shapes(K, N, M, dtype, g):
    rng = np.random.default_rng(K + N + M)
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.02)
    sqw = jm.quantize_sparse(w, g, dtype=dtype)
    x = jnp.asarray(rng.standard_normal((M, K), np.float32), dtype)
    y = jax.jit(jm.marlin_matmul)(x, sqw)
    assert next(iter(y.devices())).platform == "gpu"
    ref = jnp.matmul(x.astype(jnp.float32), jm.dequantize(sqw).astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert err <= TOLERANCE[np.dtype(dtype)], err
