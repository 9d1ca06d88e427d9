"""Where the time of a call goes between kernels, in a jitted program of many calls.

    python benchmarks/call_overhead.py [--shapes 4096x4096:1,8192x8192:16] [--calls 256]

For each shape and op (``marlin_matmul`` on a 4-bit weight, ``jnp.dot`` on a
16-bit one) it runs the bench's unrolled program (one product per call, weights
rotating through 4x the L2) and reports, per call:
  kernel  sum of the GPU kernel durations the profiler records,
  span    first kernel start to last kernel end of one run, over the calls
          (kernel time plus the gaps between kernels, without host dispatch
          between runs),
  wall    the bench's wall timer (host clock around many async runs),
and the host events of one run that take the most time (what the executor
does per call). Run it under different ``XLA_FLAGS`` (e.g. command buffers
off: ``--xla_gpu_enable_command_buffer=``) to see what they change; one line
of JSON a row is printed for the logs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile

import jax
import jax.numpy as jnp

import jax_marlin as jm
from jax_marlin import _ffi, bench


def trace_runs(fn, args, reps):
    """Kernel-sum and span per run (us), and host event totals per run."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        gpu, host = bench.gpu_and_host_events(bench.load_trace(d))
    gpu.sort(key=lambda e: float(e["ts"]))
    per_run = len(gpu) // reps
    sums, spans = [], []
    for r in range(reps):
        run = gpu[r * per_run:(r + 1) * per_run]
        sums.append(sum(float(e["dur"]) for e in run))
        spans.append(max(float(e["ts"]) + float(e["dur"]) for e in run) - float(run[0]["ts"]))
    # The executor's own events (thunks, launches), not Python's frames ("$...")
    # or the wrappers around a whole run.
    by_name = collections.Counter()
    for e in host:
        name = str(e.get("name"))
        if name.startswith("$") or "Execute" in name or "Pjit" in name:
            continue
        by_name[name] += float(e.get("dur", 0.0))
    return statistics.median(sums), statistics.median(spans), per_run, by_name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x4096:1,8192x8192:16",
                    help="KxN:M items, comma separated")
    ap.add_argument("--calls", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--label", default=os.environ.get("XLA_FLAGS", "default flags"))
    args = ap.parse_args(argv)
    print(f"# {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    for item in args.shapes.split(","):
        kn, m = item.split(":")
        K, N = (int(v) for v in kn.split("x"))
        M = int(m)
        calls = args.calls
        xs = bench.activations(jax.random.PRNGKey(1), M, K, jnp.float16, calls)
        ops = {
            "marlin": (jm.marlin_matmul, bench.marlin_weights(
                jax.random.PRNGKey(0), K, N, 128, jnp.float16,
                bench.copies_for(bench.marlin_bytes(0, K, N, 128)))),
            "dense": (jnp.dot, bench.dense_weights(
                jax.random.PRNGKey(2), K, N, jnp.float16, bench.copies_for(K * N * 2))),
        }
        for op, (f, ws) in ops.items():
            fn = bench.unrolled(f)
            fargs = (xs, bench.rotate(ws, calls))
            captured0 = _ffi._ext.cuda_captured_calls()
            wall = bench.WallTimer(args.reps)
            wall.add("x", fn, fargs, calls)
            t_wall = wall.run()["x"] * 1e6
            k_sum, span, kernels, host = trace_runs(fn, fargs, args.reps)
            # Executions of our handler that XLA recorded into a CUDA graph.
            captured = _ffi._ext.cuda_captured_calls() - captured0
            top = [(name, round(t / args.reps / calls, 2)) for name, t in host.most_common(12)]
            row = dict(label=args.label, op=op, K=K, N=N, M=M, calls=calls,
                       kernels_per_call=kernels / calls, kernel_us=k_sum / calls,
                       span_us=span / calls, wall_us=t_wall, captured_executions=captured,
                       host_us_per_call_top=top)
            print(f"{op:6s} {K}x{N} M={M}: kernel {k_sum / calls:6.2f}  span {span / calls:6.2f}  "
                  f"wall {t_wall:6.2f} us a call  ({kernels / calls:.2f} kernels a call; "
                  f"{captured} handler executions captured)", flush=True)
            for name, t in top:
                print(f"    host {t:7.2f} us/call  {name[:100]}")
            print("JSON " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
