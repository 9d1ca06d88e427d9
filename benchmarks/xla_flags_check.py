"""Checks marlin_matmul's results under the XLA flags of the environment.

    XLA_FLAGS=--xla_gpu_... python benchmarks/xla_flags_check.py

Some XLA flags change how a compiled program's CUDA graph (command buffer)
is replayed, e.g. whether it is updated when the buffers of a run differ from
the last one's. This runs one jitted program (a chain of dense and 2:4 sparse
Marlin calls, as in a decoder) several times on fresh activations and fresh
weights, at M = 1 and 16, and compares each result with the plain-jnp
reference. Exit status 1 if any run is off. scripts/jax_ab.sh runs it for
every flag variant before timing it.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_marlin as jm
from jax_marlin.ops import marlin_matmul_reference

K = N = 4096
RUNS = 4
TOLERANCE = 2e-2  # relative to the largest |y|: fp16 rounding of three chained products


def weights(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    w = [jax.random.normal(k, (K, N), jnp.float32) * 0.05 for k in keys]
    return [jm.quantize(w[0], 128, dtype=jnp.float16), jm.quantize_sparse(w[1], 128, dtype=jnp.float16),
            jm.quantize(w[2], None, dtype=jnp.float16)]


@jax.jit
def chain(x, ws):
    for w in ws:
        x = jm.marlin_matmul(x, w) * jnp.float16(0.05)
    return x


def reference(x, ws):
    for w in ws:
        x = (marlin_matmul_reference(x, w) * 0.05).astype(jnp.float16)
    return x


def main():
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    ok = True
    for m in (1, 16):
        for run in range(RUNS):
            ws = weights(run % 2)  # new weight buffers every run, two distinct sets of values
            x = jax.random.normal(jax.random.key(1000 * m + run), (m, K), jnp.float16)
            y = np.asarray(chain(x, ws), np.float32)
            r = np.asarray(reference(x, ws), np.float32)
            err = float(np.max(np.abs(y - r)) / (np.max(np.abs(r)) + 1e-30))
            good = bool(np.isfinite(y).all()) and err < TOLERANCE
            ok &= good
            print(f"M={m} run {run}: max rel err {err:.2e} {'ok' if good else 'WRONG'}", flush=True)
    print("xla_flags_check:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
