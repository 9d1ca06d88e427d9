"""Decode benchmark of the Llama-style decoder: int4 (Marlin) vs bf16, tokens/s and the
share of decode time spent in the Marlin kernel. Meant for GPUs; runs anywhere.

    python -m jax_marlin.models.bench --config llama2-7b --batches 1,4,16,32 --commit HASH
    python -m jax_marlin.models.bench --config llama2-70b --tp 2 --batches 1,16 --commit HASH
    python -m jax_marlin.models.bench --config llama2-7b --layers 8 ...   # fewer layers: quicker

For each of int4 and bf16 (same shapes, random weights made on the devices,
sharded over ``--tp`` devices with the model's logical-axis rules) and each
batch size, it runs the generation loop's compiled decode program
(``jax_marlin.models.generate``; greedy, no stop tokens) for ``--new-tokens``
steps after a prompt of ``--prompt-len`` cache slots, and reports

- decode tokens/s = batch x steps / wall time (median of ``--reps`` runs,
  compilation excluded), and ms a step;
- from a ``jax.profiler`` trace of one more run: the share of the GPU kernel
  time spent in kernels whose name contains "marlin", and the GPU busy
  share of the run's wall time, plus the largest kernels.

Decode only: the KV cache is a zeroed one of the prompt's length (attention
reads the same number of slots as after a real prefill, so a step costs the
same); ``--prefill`` also times the prefill of the prompts. A variant whose
weights and cache do not fit the devices' memory is reported as not fitting
(estimated first, else caught as an out-of-memory error): the point of
Llama-2-70B on two 80 GB GPUs. JAX preallocates 75% of GPU memory by
default; ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95`` gives each variant more.

Results: ``llama_decode_<config>_L<layers>_tp<N>_<date>.json`` and ``.png`` under
``--out``. The JSON is rewritten after every row (``"complete": false`` until the
run ends), so a run cut off by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jax_marlin import _ffi
from jax_marlin.bench import git_commit, gpu_and_host_events, load_trace, run_environment
from jax_marlin.models import generate as gen
from jax_marlin.models import llama

VARIANTS = ("int4", "bf16")


# --- Profile: GPU kernel time ----------------------------------------------------


def gpu_kernel_events(trace_dir: str) -> list[dict]:
    """Complete ("X") events on GPU stream threads of the newest perfetto trace under trace_dir."""
    gpu, _ = gpu_and_host_events(load_trace(trace_dir))
    return gpu


def kernel_summary(events, wall_s: float, top: int = 6) -> dict:
    """Marlin share of GPU kernel time, GPU busy share of the wall time, largest kernels.

    With several GPUs (tensor parallel) the kernel times of all of them are
    summed and the busy share is per GPU on average.
    """
    if not events:
        return dict(marlin_share=None, gpu_busy_share=None, top_kernels=[],
                    note="no GPU kernel events in the trace (not a GPU run?)")
    by_name: dict[str, float] = {}
    for e in events:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + float(e["dur"]) * 1e-6
    total = sum(by_name.values())
    marlin = sum(t for n, t in by_name.items() if "marlin" in n.lower())
    gpus = len({e["pid"] for e in events})
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return dict(marlin_share=marlin / total, gpu_kernel_s=total, gpus=gpus,
                gpu_busy_share=total / gpus / wall_s,
                top_kernels=[dict(name=n[:120], share=t / total) for n, t in ranked])


# --- One variant -------------------------------------------------------------------


def build(cfg, variant, dtype, mesh, group_size, seed=0):
    """(graphdef, sharded random state, weight bytes)."""
    kind = "int4" if variant == "int4" else "dense"
    factory = llama.dense_factory(kind, dtype, group_size=group_size)
    abstract = nnx.eval_shape(lambda: llama.Llama(cfg, dense=factory, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = llama.param_shardings(abstract_state, mesh)
    state = llama.random_state(abstract, seed, shardings, on_device=True)
    return graphdef, state, llama.count_bytes(abstract_state)


def estimated_bytes_per_device(weight_bytes, cfg, batch, max_len, tp):
    cache = 2 * cfg.n_layers * batch * max_len * cfg.n_kv_heads * cfg.head_dim * 2
    return (weight_bytes + cache) / tp


def device_memory_limit():
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may have no memory stats
        stats = {}
    return stats.get("bytes_limit")


def decode_runner(graphdef, state, cfg, batch, prompt_len, steps, mesh, dtype):
    """(setup, run): ``setup()`` makes a fresh (donated) KV cache, ``run(cache)`` runs
    the compiled decode loop once and waits for it."""
    cache_sh = llama.cache_shardings(cfg, mesh)
    max_len = prompt_len + steps
    pad = jnp.zeros((batch,), jnp.int32)
    logits0 = jnp.zeros((batch, cfg.vocab_size), jnp.float32)

    def setup():
        return jax.block_until_ready(llama.init_cache(cfg, batch, max_len, dtype, cache_sh))

    def run(cache):
        out = gen._decode(graphdef, state, cache, logits0, jnp.int32(prompt_len), pad,
                          jax.random.key(0), gen.stop_array(()), jnp.int32(0), steps=steps,
                          sampling=gen.Sampling(), return_logits=False)
        jax.block_until_ready(out[0])

    return setup, run


def prefill_runner(graphdef, state, cfg, batch, prompt_len, steps, mesh, dtype):
    cache_sh = llama.cache_shardings(cfg, mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt_len)),
                         jnp.int32)
    pad = jnp.zeros((batch,), jnp.int32)

    def setup():
        return jax.block_until_ready(llama.init_cache(cfg, batch, prompt_len + steps, dtype, cache_sh))

    def run(cache):
        jax.block_until_ready(gen._prefill(graphdef, state, tokens, pad, cache)[0])

    return setup, run


def captured_calls() -> int:
    """Executions of the CUDA handlers so far that ran under CUDA-graph capture
    (recordings: a recorded graph replays without running the handler)."""
    ext = _ffi._ext
    return int(ext.cuda_captured_calls()) if ext.has_cuda() else 0


def timed(setup, run, reps):
    """Median wall time of ``run(setup())`` over reps, the setup not timed."""
    t = []
    for _ in range(reps):
        inputs = setup()
        t0 = time.perf_counter()
        run(inputs)
        t.append(time.perf_counter() - t0)
    return statistics.median(t)


def is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "Out of memory" in s


def bench_variant(variant, cfg, args, mesh, log, on_row=lambda row: None):
    dtype = jnp.dtype(args.dtype)
    rows = []
    limit = device_memory_limit()
    factory_bytes = None
    try:
        t0 = time.perf_counter()
        # Estimate before building: a model that cannot fit is not made at all.
        kind = "int4" if variant == "int4" else "dense"
        abstract = nnx.eval_shape(lambda: llama.Llama(
            cfg, dense=llama.dense_factory(kind, dtype, group_size=args.group_size), rngs=nnx.Rngs(0)))
        factory_bytes = llama.count_bytes(nnx.state(abstract))
        need = estimated_bytes_per_device(factory_bytes, cfg, max(args.batches),
                                          args.prompt_len + args.new_tokens, args.tp)
        if limit and need > 0.97 * limit:
            msg = (f"does not fit: ~{need / 2**30:.1f} GiB a device (weights + KV cache at batch "
                   f"{max(args.batches)}) > {limit / 2**30:.1f} GiB available")
            log(f"{variant}: {msg}")
            row = dict(variant=variant, fits=False, note=msg, weight_bytes=factory_bytes)
            on_row(row)
            return [row]
        graphdef, state, weight_bytes = build(cfg, variant, dtype, mesh, args.group_size)
        jax.block_until_ready(state)
        log(f"{variant}: {weight_bytes / 2**30:.2f} GiB of weights ({weight_bytes / args.tp / 2**30:.2f} "
            f"a device), made in {time.perf_counter() - t0:.1f} s")
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        log(f"{variant}: out of memory while making the weights")
        row = dict(variant=variant, fits=False, note=f"out of memory making the weights: {str(e)[:200]}",
                   weight_bytes=factory_bytes)
        on_row(row)
        return [row]

    for batch in args.batches:
        row = dict(variant=variant, batch=batch, fits=True, weight_bytes=weight_bytes)
        try:
            setup, run = decode_runner(graphdef, state, cfg, batch, args.prompt_len,
                                       args.new_tokens, mesh, dtype)
            t0 = time.perf_counter()
            run(setup())  # compile + warm up
            row["compile_s"] = time.perf_counter() - t0
            captured0 = captured_calls()
            wall = timed(setup, run, args.reps)
            # Marlin calls XLA recorded (or re-recorded) into CUDA graphs in the
            # timed runs. 0 means either that no graph holds them or that the
            # graphs were recorded before (in the warm-up) and only replayed.
            row["captured_calls"] = captured_calls() - captured0
            steps = args.new_tokens - 1  # decode forward passes a run
            row.update(decode_s=wall, steps=steps, ms_per_step=wall / steps * 1e3,
                       decode_tokens_per_s=batch * steps / wall)
            if args.profile:
                cache = setup()
                with tempfile.TemporaryDirectory() as d:
                    with jax.profiler.trace(d, create_perfetto_trace=True):
                        t0 = time.perf_counter()
                        run(cache)
                        traced_wall = time.perf_counter() - t0
                    row["profile"] = kernel_summary(gpu_kernel_events(d), traced_wall)
            if args.prefill:
                pre_setup, pre = prefill_runner(graphdef, state, cfg, batch, args.prompt_len,
                                                args.new_tokens, mesh, dtype)
                pre(pre_setup())
                row["prefill_ms"] = timed(pre_setup, pre, args.reps) * 1e3
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            row.update(fits=False, note=f"out of memory at batch {batch}: {str(e)[:200]}")
        prof = row.get("profile") or {}
        share = prof.get("marlin_share")
        log(f"{variant} batch {batch:3d}: "
            + (f"{row['decode_tokens_per_s']:9.1f} tok/s, {row['ms_per_step']:7.2f} ms/step"
               + (f", marlin {100 * share:.0f}% of GPU kernel time, GPU busy "
                  f"{100 * prof['gpu_busy_share']:.0f}%" if share is not None else "")
               + (f", prefill {row['prefill_ms']:.1f} ms" if "prefill_ms" in row else "")
               + f", {row['captured_calls']} marlin calls recorded into CUDA graphs while timed"
               + f" (compile {row['compile_s']:.0f} s)"
               if row["fits"] else row["note"]))
        rows.append(row)
        on_row(row)
    del state
    return rows


# --- Output --------------------------------------------------------------------------


def speedups(rows) -> dict:
    by = {(r["variant"], r.get("batch")): r for r in rows if r.get("fits")}
    out = {}
    for (v, b), r in by.items():
        if v == "int4" and ("bf16", b) in by:
            out[str(b)] = r["decode_tokens_per_s"] / by[("bf16", b)]["decode_tokens_per_s"]
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    batches = sorted({r["batch"] for r in result["rows"] if r.get("batch")})
    width = 0.38
    for i, v in enumerate(VARIANTS):
        ys = []
        for b in batches:
            r = next((r for r in result["rows"] if r["variant"] == v and r.get("batch") == b
                      and r.get("fits")), None)
            ys.append(r["decode_tokens_per_s"] if r else 0.0)
        xs = np.arange(len(batches)) + (i - 0.5) * width
        ax.bar(xs, ys, width, label=v)
        if not any(ys):
            ax.text(xs.mean() if len(xs) else 0, 0, f"{v}: does not fit", rotation=90,
                    va="bottom", ha="center")
    for j, b in enumerate(batches):
        s = result["speedup_int4_vs_bf16"].get(str(b))
        if s:
            ax.annotate(f"{s:.2f}x", (j, 0), xytext=(0, 3), textcoords="offset points", ha="center")
    ax.set_xticks(np.arange(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{result['config']} ({result['layers']} layers), tp={result['tp']}: "
                 f"{result['device']}", fontsize=9)
    ax.legend()
    ax = axes[1]
    shares = [(r["batch"], r["profile"]["marlin_share"]) for r in result["rows"]
              if r["variant"] == "int4" and r.get("profile", {}).get("marlin_share") is not None]
    if shares:
        ax.bar([str(b) for b, _ in shares], [100 * s for _, s in shares])
    ax.set_xlabel("batch")
    ax.set_ylabel("% of GPU kernel time in marlin (int4 decode)")
    ax.set_ylim(0, 100)
    fig.suptitle(f"commit {result['commit']}, {result['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", choices=sorted(llama.CONFIGS), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="use only this many layers")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--variants", default="int4,bf16")
    ap.add_argument("--prompt-len", type=int, default=64, help="cache slots before decoding")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens a run generates")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--unfused", action="store_true",
                    help="7 projections a layer (q, k, v, o, gate, up, down) instead of the "
                         "fused 4 (qkv, o, gate_up, down)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--prefill", action="store_true", help="also time the prefill")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results"))
    ap.add_argument("--commit", default=None, help="commit id to record (default: git, if any)")
    ap.add_argument("--compilation-cache", default=None,
                    help="directory for JAX's persistent compilation cache (quicker reruns)")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)

    cfg = llama.CONFIGS[args.config].replace(fused_projections=not args.unfused)
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    llama.check_tensor_parallel(cfg, args.tp, args.group_size)
    if args.tp > jax.device_count():
        raise SystemExit(f"--tp {args.tp}: only {jax.device_count()} devices.")
    mesh = Mesh(np.array(jax.devices()[:args.tp]).reshape(1, args.tp), ("data", "model"))
    dev = jax.devices()[0]
    logs = []

    def log(s):
        print(s, flush=True)
        logs.append(s)

    log(f"{args.tp} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}; {args.config} shapes "
        f"with {cfg.n_layers} layers ({cfg.n_params() / 1e6:,.0f}M parameters), random weights; "
        f"{args.dtype}, group {args.group_size}, {'unfused (7)' if args.unfused else 'fused (4)'} "
        f"projections a layer; decode {args.new_tokens} tokens after "
        f"{args.prompt_len} cache slots")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = dict(
        benchmark="llama decode (jax_marlin.models.bench)", device=dev.device_kind,
        platform=dev.platform, devices=args.tp, jax=jax.__version__,
        commit=args.commit or git_commit(), date=stamp, environment=run_environment(),
        config=args.config, layers=cfg.n_layers,
        params=cfg.n_params(), tp=args.tp, dtype=args.dtype, group_size=args.group_size,
        fused_projections=cfg.fused_projections,
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps,
        weights="random", memory_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "default"),
        complete=False, rows=[], log=logs)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"llama_decode_{args.config}_L{cfg.n_layers}_tp{args.tp}"
                        f"{'_unfused' if args.unfused else ''}_{stamp}")

    def save():
        # Rewritten after every row, so a run cut off (a time limit, a crash)
        # keeps what it measured; "complete" says whether it got to the end.
        result["speedup_int4_vs_bf16"] = speedups(result["rows"])
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)

    def on_row(row):
        result["rows"].append(row)
        save()

    for variant in args.variants.split(","):
        bench_variant(variant, cfg, args, mesh, log, on_row)
    for b, s in result["speedup_int4_vs_bf16"].items():
        log(f"batch {b}: int4 / bf16 decode speed {s:.2f}x")
    result["complete"] = True
    save()
    try:
        plot(result, base + ".png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"wrote {base}.json")
    return result


if __name__ == "__main__":
    main()
