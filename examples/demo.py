"""Quantize a random weight to 4 bits and multiply by it with the Marlin kernel.

    python examples/demo.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_marlin as jm
from jax_marlin.ops import marlin_matmul_reference


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def main():
    rng = np.random.default_rng(0)
    K, N, M = 4096, 4096, 16
    w = jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.02, jnp.float16)
    x = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.float16)

    qw = jm.quantize(w, group_size=128)
    print(f"weight {qw.shape}, group size {qw.group_size}, scales {qw.dtype}: "
          f"packed {qw.packed.shape} {qw.packed.dtype}, scales {qw.scales.shape}")

    y = jax.jit(jm.marlin_matmul)(x, qw)
    dense = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    print(f"y = marlin_matmul(x, qw): {y.shape} {y.dtype}")
    print(f"relative error vs dense x @ w (4-bit quantization): {rel_err(y, dense):.3e}")
    print(f"relative error vs reference x @ dequantize(qw):      "
          f"{rel_err(y, marlin_matmul_reference(x, qw)):.3e}")
    print(f"ran on jax backend {jax.default_backend()!r}; "
          f"jax_marlin kernels in this build: {sorted(jm.backends())}")


if __name__ == "__main__":
    main()
