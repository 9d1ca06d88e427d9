"""Where the large-M dense path's time goes (GPU only; a diagnostic, not a test).

    python3 benchmarks/dense_path_probe.py [--layers 8192x57344,8192x8192] [--batches 256,2048]

marlin_matmul sends large M to "dequantize + dot" (ops._dense_call): the
codes are unpacked from the Marlin layout, dequantized to a 16-bit (K, N)
weight, and XLA runs the GEMM. On the H100 that path took 3710 us at
M = 2048 on 8192x57344 against 2801 us for ``jnp.dot`` on a 16-bit weight,
where writing the 16-bit weight once costs ~400 us at copy bandwidth. This
times the pieces side by side (profiler kernel time, the weights rotated
through more than the L2) and lists each variant's kernels by name, so the
extra can be placed (it found the GEMM's float32 output, since removed, and
XLA's dequantize fusion at ~65% of copy bandwidth):
  dot16         jnp.dot(x, w16), the baseline
  dot16_f32out  the same GEMM with preferred_element_type=float32, cast back
  dequant       dequantize(qw) alone (XLA's fusion): the 16-bit weight materialized
  cuda_dequant  the same weight from the CUDA dequantize target
  path          ops._dense_call(on_cuda=True), what marlin_matmul runs
  path_xla_dequant  the same with XLA's dequantize
  path_f32out   the path as it was before 2619b91 (float32 GEMM output, cast back)
"""

import argparse
import collections
import tempfile

import jax
import jax.numpy as jnp

from jax_marlin import bench, ops
from jax_marlin.quantize import dequantize


def variants():
    return {
        "dot16": lambda x, w: jnp.dot(x, w[1]),
        "dot16_f32out": lambda x, w: jnp.dot(x, w[1], preferred_element_type=jnp.float32).astype(x.dtype),
        "dequant": lambda x, w: dequantize(w[0]),
        "path": lambda x, w: ops._dense_call(x, w[0].packed, w[0].scales, on_cuda=True),
        "path_xla_dequant": lambda x, w: ops._dense_call(x, w[0].packed, w[0].scales),
        "cuda_dequant": lambda x, w: ops._cuda_dequantize(w[0].packed, w[0].scales),
        "path_f32out": lambda x, w: jnp.dot(x, dequantize(w[0]),
                                            preferred_element_type=jnp.float32).astype(x.dtype),
    }


def kernels_by_name(fn, args, calls):
    """{kernel name: us a call} from one profiled run of fn(*args)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        gpu, _ = bench.gpu_and_host_events(bench.load_trace(d))
    sums = collections.Counter()
    for e in gpu:
        sums[e.get("name", "?")[:90]] += float(e["dur"]) / calls
    return sums


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="8192x57344,28672x8192,8192x8192")
    ap.add_argument("--batches", default="256,2048")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dtype = bench.DTYPES[args.dtype]
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    for layer in args.layers.split(","):
        K, N = (int(v) for v in layer.split("x"))
        key = jax.random.PRNGKey(K + N)
        copies = bench.copies_for(K * N // 2)
        qws = bench.marlin_weights(key, K, N, 128, dtype, copies)
        w16s = bench.dense_weights(key, K, N, dtype, copies)
        ws = list(zip(qws, w16s))
        for M in (int(m) for m in args.batches.split(",")):
            calls = bench.calls_for(copies, K * N // 2, 2 * M * K * N)
            xs = bench.activations(key, M, K, dtype, calls)
            timer = bench.DeviceTimer(args.reps)
            fns = {name: bench.unrolled(f) for name, f in variants().items()}
            for name, fn in fns.items():
                timer.add(name, fn, (xs, bench.rotate(ws, calls)), calls)
            t = timer.run()
            print(f"{K}x{N} M={M} {args.dtype}, {calls} calls a program, us a call (kernel time):", flush=True)
            for name in fns:
                print(f"  {name:14s} {t[name] * 1e6:10.1f}", flush=True)
            for name in ("path", "path_xla_dequant", "dequant", "cuda_dequant"):
                print(f"  kernels of {name}:")
                for kname, us in kernels_by_name(fns[name], (xs, bench.rotate(ws, calls)), calls).most_common(6):
                    print(f"    {us:10.1f}  {kname}")
            del xs


if __name__ == "__main__":
    main()
