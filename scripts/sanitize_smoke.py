"""A few small marlin_matmul calls on the GPU, checked against numpy, and
the dense path's CUDA dequantize, checked bit for bit.

Meant to run under compute-sanitizer (scripts/gpu_check.sh), so it is small:
each shape is one kernel launch sequence. M in {1, 33, 70} covers a single
row, a partial 16-row block, and more than 64 rows (two launches sharing the
lock/workspace scratch). Needs XLA_PYTHON_CLIENT_PREALLOCATE=false under the
sanitizer (its allocator hooks cannot cope with JAX grabbing most of the GPU).

    python scripts/sanitize_smoke.py     # exits non-zero on a wrong result
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_marlin as jm
from jax_marlin import ops

# (K, N, group size or None = per-channel, dtype)
CASES = [
    (256, 192, 128, jnp.float16),
    (512, 128, 32, jnp.bfloat16),
    (128, 256, None, jnp.float16),
]
# 2:4 sparse weights (issue 8): K a multiple of the sparse tile's 128.
SPARSE_CASES = [
    (256, 128, 128, jnp.float16),
    (128, 192, None, jnp.bfloat16),
]
ROWS = (1, 33, 70)
TOLERANCE = {jnp.float16: 2e-3, jnp.bfloat16: 1e-2}


def reference(x, codes, scales, group_size):
    """x @ W_hat in float64, W_hat = (code - 8) * s rounded to the activation dtype."""
    K = codes.shape[0]
    g = K if group_size is None else group_size
    s = np.repeat(np.asarray(scales), g, axis=0)
    w = ((codes.astype(np.float32) - 8) * s.astype(np.float32)).astype(scales.dtype)
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def sparse_reference(x, sqw):
    """x @ W_hat in float64, W_hat the pruned, dequantized weight the kernel multiplies by."""
    w = np.asarray(jm.dequantize(sqw).astype(jnp.float32), np.float64)
    return np.asarray(x, np.float64) @ w


def check(name, y, ref, dtype) -> bool:
    y = np.asarray(y.astype(jnp.float32), np.float64)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    ok = bool(np.isfinite(y).all() and err <= TOLERANCE[dtype])
    print(f"{'ok  ' if ok else 'FAIL'} {name}: relative error {err:.2e}")
    return ok


def main() -> int:
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        print("no GPU in jax.devices(); nothing to check")
        return 1
    print(f"device: {gpus[0].device_kind}; backends: {sorted(jm.backends())}")
    rng = np.random.default_rng(0)
    failures = 0
    for K, N, group_size, dtype in CASES:
        G = 1 if group_size is None else K // group_size
        codes = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
        scales = rng.uniform(0.005, 0.015, size=(G, N)).astype(np.float32).astype(dtype)
        qw = jax.device_put(jm.pack(codes, scales), gpus[0])
        for M in ROWS:
            x = rng.standard_normal((M, K)).astype(np.float32).astype(dtype)
            y = jm.marlin_matmul(jax.device_put(x, gpus[0]), qw)
            name = f"M={M} K={K} N={N} g={group_size or 'K'} {jnp.dtype(dtype).name}"
            failures += not check(name, y, reference(x, codes, scales, group_size), dtype)
        # The large-M dense path's CUDA dequantize: the exact weight.
        w = np.asarray(ops._cuda_dequantize(qw.packed, qw.scales).astype(jnp.float32))
        exact = np.array_equal(w, np.asarray(jm.dequantize(qw).astype(jnp.float32)))
        print(f"{'ok  ' if exact else 'FAIL'} dequantize K={K} N={N} g={group_size or 'K'} "
              f"{jnp.dtype(dtype).name}: {'bit-exact' if exact else 'differs'}")
        failures += not exact
    for K, N, group_size, dtype in SPARSE_CASES:
        w = rng.standard_normal((K, N)).astype(np.float32)
        sqw = jm.quantize_sparse(w, group_size, dtype=dtype)
        on_gpu = jax.device_put(sqw, gpus[0])
        for M in ROWS:
            x = rng.standard_normal((M, K)).astype(np.float32).astype(dtype)
            y = jm.marlin_matmul(jax.device_put(x, gpus[0]), on_gpu)
            name = f"2:4 sparse M={M} K={K} N={N} g={group_size or 'K'} {jnp.dtype(dtype).name}"
            failures += not check(name, y, sparse_reference(x, sqw), dtype)
    print("all ok" if not failures else f"{failures} case(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
