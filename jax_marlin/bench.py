"""Benchmark of marlin_matmul against the memory roofline and XLA baselines.

    python -m jax_marlin.bench [--quick] [--sets llama2-7b,llama2-70b,16k] [--out DIR]
    python -m jax_marlin.bench --tune-dispatch [--sets ...] [--sparse]   # the large-M dispatch table
    python -m jax_marlin.bench --sparse ...   # also 2:4 sparse int4 weights on every row

For every layer (K, N), batch M, dtype and group size it times, on the device:
  * marlin    ``marlin_matmul(x, qw)`` (4-bit Marlin weight),
  * dense     ``jnp.dot(x, w)`` with a 16-bit weight (cuBLAS through XLA),
  * xla_int4  ``jnp.int4`` weight dequantized then dotted, jitted (XLA's own path),
and reports the speedups and the share of the memory roofline: the bytes the
Marlin call must move (packed weight + scales + x + y) over the copy bandwidth
measured in the same run.

Timing: each program runs ``calls`` independent products (own x, weight copies
rotating through 4x the L2), enough of them for ~0.5 ms of device work. By
default a program is timed by the host clock around many back-to-back
asynchronous runs with one sync at the end (dispatch overlaps execution, so
this is device throughput; median over repetitions). ``--timer profiler``
instead sums the GPU kernel durations the JAX profiler records (kernel time
only, no gaps between kernels); ``--timer span`` takes a run's device span in
that trace (kernels and the gaps between them, not the host's time between
runs). ``--check-timing`` times one row all three ways.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import math
import os
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_marlin as jm
from jax_marlin import dispatch, ops

LAYER_SETS = {
    "llama2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama2-70b": [(8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)],
    "16k": [(16384, 16384)],
}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
PREFILL = 2048
L2_BYTES = 50 * 2**20
DTYPES = {"fp16": jnp.float16, "bf16": jnp.bfloat16}


# --------------------------------------------------------------------------
# Device timing through the profiler
# --------------------------------------------------------------------------


def load_trace(trace_dir: str) -> dict:
    """The newest perfetto_trace.json.gz that jax.profiler.trace wrote under trace_dir."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        return json.load(f)


def gpu_and_host_events(trace: dict):
    """Kernel events on GPU stream threads, and all host complete events."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    proc, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            proc[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e.get("args", {}).get("name", "")
    gpu, host = [], []
    for e in events:
        if e.get("ph") != "X":
            continue
        pname = proc.get(e["pid"], "")
        tname = thread.get((e["pid"], e["tid"]), "")
        if "GPU" in pname.upper() and tname.startswith("Stream"):
            gpu.append(e)
        else:
            host.append(e)
    return gpu, host


class DeviceTimer:
    """Times programs by the GPU kernel durations the profiler records.

    Each program gets its own trace, run ``reps`` times with a sync between
    runs; a program launches the same kernels every run, so the sorted
    kernel events split evenly into runs.
    """

    def __init__(self, reps: int):
        self.reps = reps
        self.jobs = []  # (key, fn, args, calls)

    def add(self, key, fn, args, calls):
        jax.block_until_ready(fn(*args))  # compile + warm up outside the trace
        jax.block_until_ready(fn(*args))
        self.jobs.append((key, fn, args, calls))

    def _time_job(self, fn, args, calls) -> float:
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                for _ in range(self.reps):
                    jax.block_until_ready(fn(*args))
            trace = load_trace(d)
        gpu, _ = gpu_and_host_events(trace)
        if not gpu or len(gpu) % self.reps:
            names = sorted({str(e.get("args", {}).get("name")) for e in trace["traceEvents"]
                            if e.get("ph") == "M"})
            raise RuntimeError(f"{len(gpu)} GPU kernel events for {self.reps} runs; "
                               f"trace processes/threads: {names[:40]}")
        gpu.sort(key=lambda e: float(e["ts"]))
        per_run = len(gpu) // self.reps
        totals = [self.run_time(gpu[r * per_run:(r + 1) * per_run]) for r in range(self.reps)]
        return statistics.median(totals) * 1e-6 / calls

    @staticmethod
    def run_time(kernels) -> float:
        """Microseconds one run's kernel events count for: their durations summed."""
        return sum(float(e["dur"]) for e in kernels)

    def run(self) -> dict:
        """Median device time per call (seconds) for every job key."""
        out = {key: self._time_job(fn, args, calls) for key, fn, args, calls in self.jobs}
        self.jobs = []
        return out


class WallTimer:
    """Host clock around ``runs`` back-to-back runs of a program (one sync at
    the end), divided by runs x calls: device throughput, as long as a run
    takes longer on the device than its dispatch on the host."""

    def __init__(self, reps: int, min_total_s: float = 0.02):
        self.reps = reps
        self.min_total_s = min_total_s
        self.jobs = []

    def add(self, key, fn, args, calls):
        jax.block_until_ready(fn(*args))  # compile + warm up
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = time.perf_counter() - t0
        runs = int(min(200, max(3, math.ceil(self.min_total_s / max(once, 1e-6)))))
        self.jobs.append((key, fn, args, calls, runs))

    def run(self) -> dict:
        out = {}
        for key, fn, args, calls, runs in self.jobs:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                for _ in range(runs):
                    result = fn(*args)
                jax.block_until_ready(result)
                times.append((time.perf_counter() - t0) / (runs * calls))
            out[key] = statistics.median(times)
        self.jobs = []
        return out


class SpanTimer(DeviceTimer):
    """Device span of a run in the profiler trace (first kernel start to last
    kernel end, over the calls): kernel time plus the gaps between kernels on
    the GPU, without the host's time between runs.

    What the wall timer adds to it comes from XLA's executor, not the device:
    each run of the unrolled program moves its output buffers, so XLA updates
    its command buffer (CUDA graph) before launching it again, in series with
    the previous run (H200, 4096^2 at M = 1, 256 calls a program: kernel 7.5,
    span 7.6, wall 11-14 us a call; ``benchmarks/call_overhead.py``).
    """

    @staticmethod
    def run_time(kernels) -> float:
        return (max(float(e["ts"]) + float(e["dur"]) for e in kernels)
                - min(float(e["ts"]) for e in kernels))


TIMERS = {"wall": WallTimer, "profiler": DeviceTimer, "span": SpanTimer}


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate so that the working set is 4x the L2."""
    return int(min(64, max(2, math.ceil(4 * L2_BYTES / nbytes))))


def calls_for(copies: int, nbytes: float, flops: float, target_s: float = 5e-4) -> int:
    """Calls a program makes: at least one per weight copy, and enough for
    about ``target_s`` of device work (estimated at 2.5 TB/s, 400 TFLOP/s)."""
    est = max(nbytes / 2.5e12, flops / 4e14)
    return int(min(512, max(copies, math.ceil(target_s / est))))


def rotate(items, calls):
    return [items[i % len(items)] for i in range(calls)]


def unrolled(fn):
    """One jitted program running fn on each (x_i, w_i) pair: every call has
    its own x, so XLA cannot merge calls that share an operand."""
    return jax.jit(lambda xs, ws: tuple(fn(x, w) for x, w in zip(xs, ws)))


def marlin_weights(key, K, N, group, dtype, copies):
    out = []
    G = 1 if group is None else K // group
    for i in range(copies):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        # Any 32-bit pattern is a valid packed word (eight 4-bit codes).
        packed = jax.lax.bitcast_convert_type(
            jax.random.bits(k1, (K // 16, 2 * N), jnp.uint32), jnp.int32)
        scales = jax.random.uniform(k2, (G, N), jnp.float32, 1e-3, 1e-2).astype(dtype)
        out.append(jm.QuantizedWeight(packed=packed, scales=scales))
    return out


def sparse_weights(key, K, N, group, dtype, copies):
    """2:4 sparse weights: magnitude-pruned, RTN-quantized random weights (the
    metadata must name valid positions, so they are made, not drawn)."""
    return [jm.quantize_sparse(jax.random.normal(jax.random.fold_in(key, 500 + i), (K, N), dtype),
                               group, dtype=dtype)
            for i in range(copies)]


def dense_weights(key, K, N, dtype, copies):
    return [jax.random.normal(jax.random.fold_in(key, i), (K, N), dtype) * 0.02
            for i in range(copies)]


def int4_weights(key, K, N, group, dtype, copies):
    G = 1 if group is None else K // group
    out = []
    for i in range(copies):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        w = jax.random.randint(k1, (K, N), -8, 8, jnp.int32).astype(jnp.int4)
        s = jax.random.uniform(k2, (G, N), jnp.float32, 1e-3, 1e-2).astype(dtype)
        out.append((w, s))
    return out


def xla_int4_matmul(x, ws):
    w, s = ws
    K, N = w.shape
    G = s.shape[0]
    w_hat = (w.astype(x.dtype).reshape(G, K // G, N) * s[:, None, :]).reshape(K, N)
    return jnp.dot(x, w_hat)


def activations(key, M, K, dtype, copies):
    return [jax.random.normal(jax.random.fold_in(key, 1000 + i), (M, K), dtype)
            for i in range(copies)]


def marlin_bytes(M, K, N, group, itemsize=2):
    G = 1 if group is None else K // group
    return K * N // 2 + G * N * itemsize + M * K * itemsize + M * N * itemsize


def sparse_bytes(M, K, N, group, itemsize=2):
    """2:4 sparse: values (K N / 4) + metadata (K N / 8) + scales + x + y."""
    G = 1 if group is None else K // group
    return K * N // 4 + K * N // 8 + G * N * itemsize + M * K * itemsize + M * N * itemsize


def measure_copy_bandwidth(timer_cls, reps: int = 7, n: int = 2**28) -> float:
    """Bytes read + written per second by a large device-to-device pass
    (default 1 GiB of float32), timed like the products."""
    a = jnp.arange(n, dtype=jnp.float32)
    fn = jax.jit(lambda a: a + 1.0)
    timer = timer_cls(reps)
    timer.add("copy", fn, (a,), 1)
    t = timer.run()["copy"]
    return 2 * n * 4 / t


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def bench_layer(K, N, dtype_name, batches, reps, timer_cls, sparse=False):
    dtype = DTYPES[dtype_name]
    key = jax.random.PRNGKey(K * 7 + N)
    timer = timer_cls(reps)
    groups = (128, None)
    mw = {g: marlin_weights(key, K, N, g, dtype, copies_for(marlin_bytes(0, K, N, g)))
          for g in groups}
    sw = ({g: sparse_weights(key, K, N, g, dtype, copies_for(sparse_bytes(0, K, N, g)))
           for g in groups} if sparse else {})
    dw = dense_weights(key, K, N, dtype, copies_for(2 * K * N))
    iw = int4_weights(key, K, N, 128, dtype, copies_for(K * N // 2))
    for M in batches:
        flops = 2 * M * K * N
        for g in groups:
            calls = calls_for(len(mw[g]), marlin_bytes(M, K, N, g), flops)
            xs = activations(key, M, K, dtype, calls)
            timer.add(("marlin", M, g), unrolled(jm.marlin_matmul), (xs, rotate(mw[g], calls)), calls)
            if sparse:
                calls = calls_for(len(sw[g]), sparse_bytes(M, K, N, g), flops)
                xs = activations(key, M, K, dtype, calls)
                timer.add(("sparse", M, g), unrolled(jm.marlin_matmul), (xs, rotate(sw[g], calls)),
                          calls)
        calls = calls_for(len(dw), 2 * (K * N + M * K + M * N), flops)
        xs = activations(key, M, K, dtype, calls)
        timer.add(("dense", M), unrolled(jnp.dot), (xs, rotate(dw, calls)), calls)
        calls = calls_for(len(iw), K * N // 2 + 2 * (M * K + M * N), flops)
        xs = activations(key, M, K, dtype, calls)
        timer.add(("xla_int4", M), unrolled(xla_int4_matmul), (xs, rotate(iw, calls)), calls)
    t = timer.run()
    rows = []
    for M in batches:
        for g in groups:
            row = dict(K=K, N=N, M=M, dtype=dtype_name, group=g or "channel",
                       marlin_s=t[("marlin", M, g)], bytes=marlin_bytes(M, K, N, g),
                       dense_s=t[("dense", M)], xla_int4_s=t[("xla_int4", M)])
            if sparse:
                row.update(sparse_s=t[("sparse", M, g)], sparse_bytes=sparse_bytes(M, K, N, g))
            rows.append(row)
    return rows


TUNE_BATCHES = (64, 128, 256, 512, 1024, 2048)


# The two paths of marlin_matmul on the GPU, per weight format: (weights, bytes,
# kernel path, dequantize + dot path).
_TUNE_FORMATS = {
    "dense": (marlin_weights, marlin_bytes,
              lambda x, w: ops._kernel_call(x, w.packed, w.scales),
              lambda x, w: ops._dense_call(x, w.packed, w.scales, on_cuda=True)),
    "sparse": (sparse_weights, sparse_bytes,
               lambda x, w: ops._sparse_kernel_call(x, w.values, w.meta, w.scales),
               lambda x, w: ops._sparse_dense_call(x, w.values, w.meta, w.scales)),
}


def tune_dispatch(layers, dtype_names, reps, timer_cls, batches=TUNE_BATCHES, formats=("dense",)):
    """The large-M dispatch table's entries: for each layer, dtype and weight
    format ("dense" Marlin, "sparse" 2:4), both paths of marlin_matmul on the
    GPU (the kernel; dequantize + XLA's dot), called directly, timed at each
    M, and the crossover (dispatch.crossover). Group 128 weights."""
    entries = []
    for fmt in formats:
        make_weights, nbytes, kernel, dense = _TUNE_FORMATS[fmt]
        for K, N in layers:
            for dt in dtype_names:
                dtype = DTYPES[dt]
                key = jax.random.PRNGKey(K * 7 + N)
                ws = make_weights(key, K, N, 128, dtype, copies_for(nbytes(0, K, N, 128)))
                timer = timer_cls(reps)
                for M in batches:
                    calls = calls_for(len(ws), nbytes(M, K, N, 128), 2 * M * K * N)
                    xs = activations(key, M, K, dtype, calls)
                    for name, fn in (("kernel", kernel), ("dense", dense)):
                        timer.add((name, M), unrolled(fn), (xs, rotate(ws, calls)), calls)
                t = timer.run()
                times = {M: (t[("kernel", M)], t[("dense", M)]) for M in batches}
                entry = dict(K=K, N=N, dtype=np.dtype(dtype).name, min_m=dispatch.crossover(times),
                             us={str(M): dict(kernel=round(a * 1e6, 2), dense=round(b * 1e6, 2))
                                 for M, (a, b) in times.items()})
                if fmt != "dense":
                    entry["format"] = fmt
                print(f"  {fmt} {K}x{N} {dt}: dense from M = {entry['min_m']}  "
                      + "  ".join(f"M={M}: {a * 1e6:.0f}/{b * 1e6:.0f} us"
                                  for M, (a, b) in times.items()),
                      flush=True)
                entries.append(entry)
    return entries


# Environment variables that change what a benchmark measures: XLA's flags
# (command buffers, for one) and the kernels' switches (overlapped launch, x
# by TMA, wgmma tiles, the prefill kernel).
RECORDED_ENV = ("XLA_FLAGS", "JAX_MARLIN_PDL", "JAX_MARLIN_TMA", "JAX_MARLIN_WGMMA", "JAX_MARLIN_PREFILL")


def run_environment() -> dict:
    """The RECORDED_ENV variables set for this run, for the result file."""
    return {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.check_output(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("JAX_MARLIN_COMMIT", "unknown")


def summarize(rows, bw):
    for r in rows:
        r["roofline_s"] = r["bytes"] / bw
        r["roofline_frac"] = r["roofline_s"] / r["marlin_s"]
        r["speedup_vs_dense"] = r["dense_s"] / r["marlin_s"]
        r["speedup_vs_xla_int4"] = r["xla_int4_s"] / r["marlin_s"]
        if "sparse_s" in r:
            r["sparse_roofline_frac"] = r["sparse_bytes"] / bw / r["sparse_s"]
            r["sparse_speedup_vs_marlin"] = r["marlin_s"] / r["sparse_s"]
            r["sparse_speedup_vs_dense"] = r["dense_s"] / r["sparse_s"]
    return rows


def print_table(rows):
    print(f"{'set':<11}{'K':>6}{'N':>6}{'M':>5} {'dt':<5}{'grp':>7} {'marlin_us':>10}"
          f"{'roof%':>7}{'dense_us':>10}{'x_dense':>8}{'int4_us':>9}{'x_int4':>7}")
    for r in rows:
        print(f"{r.get('set', ''):<11}{r['K']:>6}{r['N']:>6}{r['M']:>5} {r['dtype']:<5}"
              f"{str(r['group']):>7} {r['marlin_s'] * 1e6:>10.1f}{100 * r['roofline_frac']:>6.0f}%"
              + f"{r['dense_s'] * 1e6:>10.1f}{r['speedup_vs_dense']:>8.2f}"
              f"{r['xla_int4_s'] * 1e6:>9.1f}{r['speedup_vs_xla_int4']:>7.2f}"
              + (f"  2:4 sparse {r['sparse_s'] * 1e6:.1f} us, {100 * r['sparse_roofline_frac']:.0f}% roof, "
                 f"{r['sparse_speedup_vs_marlin']:.2f}x dense int4" if "sparse_s" in r else ""))


def by_set(rows, group=128):
    """Per (set, dtype, M): layer-set totals, as a model runs them all:
    roofline share = sum of roofline times / sum of kernel times; speedups =
    sum of baseline times / sum of kernel times."""
    out = {}
    for r in rows:
        if r["group"] != group:
            continue
        a = out.setdefault((r["set"], r["dtype"], r["M"]), dict(marlin=0.0, roof=0.0, dense=0.0, int4=0.0))
        a["marlin"] += r["marlin_s"]
        a["roof"] += r["roofline_s"]
        a["dense"] += r["dense_s"]
        a["int4"] += r["xla_int4_s"]
    return {k: dict(roofline_frac=a["roof"] / a["marlin"], speedup_vs_dense=a["dense"] / a["marlin"],
                    speedup_vs_xla_int4=a["int4"] / a["marlin"])
            for k, a in sorted(out.items())}


def markdown_table(rows, group=128) -> str:
    lines = ["| layer set | dtype | M | % of roofline | x `jnp.dot` 16-bit | x XLA int4 |",
             "|---|---|---|---|---|---|"]
    for (s, dt, m), v in by_set(rows, group).items():
        lines.append(f"| {s} | {dt} | {m} | {100 * v['roofline_frac']:.0f}% | "
                     f"{v['speedup_vs_dense']:.2f} | {v['speedup_vs_xla_int4']:.2f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        summary = by_set(rows)
        for dt in sorted({r["dtype"] for r in rows}):
            Ms = sorted(m for (s_, d_, m) in summary if s_ == s and d_ == dt)
            sp = [summary[(s, dt, m)]["speedup_vs_dense"] for m in Ms]
            ax.plot(Ms, sp, marker="o", label=f"marlin {dt}, g128")
            sparse = [r for r in rows if r["set"] == s and r["dtype"] == dt and r["group"] == 128
                      and "sparse_s" in r]
            if sparse:
                sMs = sorted({r["M"] for r in sparse})
                ssp = [sum(r["dense_s"] for r in sparse if r["M"] == m)
                       / sum(r["sparse_s"] for r in sparse if r["M"] == m) for m in sMs]
                ax.plot(sMs, ssp, marker="s", linestyle=":", label=f"2:4 sparse {dt}, g128")
        ax.axhline(4.0, color="gray", linestyle="--", label="4x ideal")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch M")
        ax.set_ylabel("speedup over 16-bit jnp.dot")
        ax.set_title(s)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save_json(result: dict, out_dir: str, tag: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"bench_{tag}_{result['date']}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    return json_path


def write_results(result: dict, out_dir: str, tag: str) -> str:
    """The final JSON, the plot and the tables."""
    json_path = save_json(result, out_dir, tag)
    try:
        plot(result["rows"], json_path[:-len(".json")] + ".png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print_table(result["rows"])
    print()
    print(markdown_table(result["rows"]))
    print(f"wrote {json_path}")
    return json_path


def _latest_rows(results) -> dict:
    rows = {}
    for r in results:
        for row in r["rows"]:
            key = (row.get("set"), row["K"], row["N"], row["M"], row["dtype"], row["group"])
            rows.pop(key, None)  # re-inserted: the table keeps the later file's order
            rows[key] = dict(row, commit=row.get("commit", r["commit"]))
    return rows


def combine(paths, out_dir) -> str:
    """Merge result files of one device (e.g. a full run split over several
    invocations by --sets/--dtypes) into one file with one plot. A row
    measured again in a later file (same set, shape, M, dtype and group)
    replaces the earlier one, so a re-run of some batch sizes after a kernel
    change supersedes just those rows; each row keeps its file's commit."""
    results = [json.load(open(p)) for p in paths]
    devices = {r["device"] for r in results}
    if len(devices) != 1:
        raise SystemExit(f"--combine: results come from different devices: {sorted(devices)}")
    stamp = max(r["date"] for r in results)
    # A combined file may be combined again: its list fields are flattened.
    def each(field, default=None):
        out = []
        for r in results:
            v = r.get(field, default)
            out.extend(v if isinstance(v, list) else [v])
        return out

    merged = dict(device=devices.pop(), platform=results[0]["platform"], jax=results[0]["jax"],
                  commit=",".join(sorted({c for r in results for c in r["commit"].split(",")})),
                  date=stamp, environment=each("environment", {}),
                  combined_from=[os.path.basename(p) for p in paths],
                  copy_bandwidth_Bps=each("copy_bandwidth_Bps"),
                  timing=sorted(set(each("timing"))),
                  timing_check=next((r["timing_check"] for r in results if r.get("timing_check")), None),
                  rows=list(_latest_rows(results).values()))
    return write_results(merged, out_dir, "combined")


def check_timing(reps: int = 7, K: int = 8192, N: int = 8192, M: int = 16, calls: int = 256) -> dict:
    """One row timed every way (profiler kernel time, device span, wall clock over async runs), for the
    Marlin kernel and for ``jnp.dot`` on a 16-bit weight: they agree when nothing but kernels
    fills the program's time (the wall clock also holds XLA's work between runs)."""
    xs = activations(jax.random.PRNGKey(1), M, K, jnp.float16, calls)
    ws = marlin_weights(jax.random.PRNGKey(0), K, N, 128, jnp.float16,
                        copies_for(marlin_bytes(0, K, N, 128)))
    dws = dense_weights(jax.random.PRNGKey(2), K, N, jnp.float16, copies_for(K * N * 2))
    check = dict(K=K, N=N, M=M, calls_per_program=calls)
    for op, fn, w in (("marlin", jm.marlin_matmul, ws), ("dense", jnp.dot, dws)):
        times = {}
        for name, timer_cls in TIMERS.items():
            timer = timer_cls(reps)
            timer.add("x", unrolled(fn), (xs, rotate(w, calls)), calls)
            times[name] = timer.run()["x"]
        t_dev, t_span, t_wall = times["profiler"], times["span"], times["wall"]
        check[op] = dict(device_s=t_dev, span_s=t_span, wall_s=t_wall, ratio=t_wall / t_dev)
        print(f"timing check {op} {K}x{N} M={M}, {calls} calls a program: profiler (kernel time) "
              f"{t_dev * 1e6:.1f} us, device span {t_span * 1e6:.1f} us, wall clock over async "
              f"runs {t_wall * 1e6:.1f} us a call (wall / kernel {t_wall / t_dev:.3f})", flush=True)
    return check


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(LAYER_SETS), help="comma-separated layer sets")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--quick", action="store_true",
                    help="one 70B layer, M in {1, 16, 64}, fp16+bf16: a few minutes")
    ap.add_argument("--batches", default=None,
                    help="comma-separated M values (default 1..128 and the prefill 2048)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                    help="wall: host clock over many async runs; profiler: kernel durations; "
                         "span: first kernel start to last kernel end of a run")
    ap.add_argument("--check-timing", action="store_true",
                    help="also time one row with every timer (profiler, span, wall clock) to compare them")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--commit", default=None,
                    help="commit id to record (default: git rev-parse HEAD, if available)")
    ap.add_argument("--sparse", action="store_true",
                    help="also time 2:4 sparse int4 weights (jm.quantize_sparse) on every row")
    ap.add_argument("--tune-dispatch", action="store_true",
                    help="measure the kernel vs dequantize + dot at large M and write the "
                         "dispatch table for this GPU kind (copy it into jax_marlin/dispatch_tables/)")
    ap.add_argument("--formats", default=None,
                    help="with --tune-dispatch: the weight formats to measure, comma-separated "
                         "(dense, sparse; default dense, and sparse too with --sparse)")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="merge earlier result files into one (no measuring); a row measured "
                         "again in a later file replaces the earlier one")
    args = ap.parse_args(argv)
    formats = (tuple(args.formats.split(",")) if args.formats
               else ("dense", "sparse") if args.sparse else ("dense",))
    if not set(formats) <= set(_TUNE_FORMATS):
        ap.error(f"--formats: each of {sorted(_TUNE_FORMATS)}, got {args.formats!r}")
    if args.combine:
        combine(args.combine, args.out)
        return

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; "
          f"jax_marlin from {os.path.dirname(jm.__file__)}", flush=True)
    bw = measure_copy_bandwidth(TIMERS[args.timer])
    print(f"copy bandwidth (read + write): {bw / 1e12:.3f} TB/s", flush=True)

    if args.tune_dispatch:
        layers = [kn for s in args.sets.split(",") for kn in LAYER_SETS[s]]
        batches = (tuple(int(m) for m in args.batches.split(",")) if args.batches
                   else TUNE_BATCHES)
        entries = tune_dispatch(layers, args.dtypes.split(","), args.reps, TIMERS[args.timer],
                                batches, formats)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        # Entries this run did not measure (other layers, dtypes, formats)
        # carry over from the table shipped for this GPU kind.
        merged = dispatch.merge_entries(dispatch.load_table(dev.device_kind), entries)
        table = dict(device=dev.device_kind, jax=jax.__version__, commit=args.commit or git_commit(),
                     date=stamp, timing=args.timer, entries=merged,
                     measured_now=len(entries), carried_over=len(merged) - len(entries))
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"dispatch_{stamp}_{dispatch.table_name(dev.device_kind)}")
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {path}: copy it to jax_marlin/dispatch_tables/"
              f"{dispatch.table_name(dev.device_kind)} to use it")
        return

    if args.quick:
        plan = {"llama2-70b": [(8192, 8192)]}
        batches = (1, 16, 64)
    else:
        plan = {s: LAYER_SETS[s] for s in args.sets.split(",")}
        batches = (tuple(int(m) for m in args.batches.split(",")) if args.batches
                   else BATCHES + (PREFILL,))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                  commit=args.commit or git_commit(), date=stamp, environment=run_environment(),
                  copy_bandwidth_Bps=bw,
                  timing=args.timer, timing_doc=TIMERS[args.timer].__doc__.split("\n")[0],
                  timing_check=None, complete=False, rows=[])
    tag = "quick" if args.quick else "full"
    # The JSON is rewritten after every layer, so that a run cut short (a
    # device time limit) keeps what it measured; "complete" says whether it
    # got to the end.
    for set_name, layers in plan.items():
        for K, N in layers:
            for dt in args.dtypes.split(","):
                t0 = time.time()
                new = bench_layer(K, N, dt, batches, args.reps, TIMERS[args.timer], args.sparse)
                for r in new:
                    r["set"] = set_name
                result["rows"] += summarize(new, bw)
                save_json(result, args.out, tag)
                print(f"  {set_name} {K}x{N} {dt}: {time.time() - t0:.0f}s", flush=True)

    result["timing_check"] = check_timing(args.reps) if args.check_timing else None
    result["complete"] = True
    write_results(result, args.out, tag)


if __name__ == "__main__":
    main()
