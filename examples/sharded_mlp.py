"""A tensor-parallel Llama MLP block with 4-bit weights, over all devices.

    python examples/sharded_mlp.py                     # small block, checks + collectives
    python examples/sharded_mlp.py --d 8192 --f 28672 --kv 1024 --time --out DIR  # 70B-sized, timed
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python examples/sharded_mlp.py                 # 8 fake CPU devices

gate and up are column parallel, down row parallel (jax_marlin.sharding's
LLAMA_PROJECTIONS): each device holds 1/n of every weight, and the block
needs one all-reduce of its output. The ``_fused`` blocks use one gate_up
and one qkv weight, as the Llama model does (fewer, wider kernels). The attention projections likewise:
q/k/v column parallel (whole heads), o row parallel (its input stands in
for the attention output, which is head-sharded like q). The sharded result
is checked against the one-device one; the compiled module's collectives are
listed.

``--time``: each block's device throughput on 1 device and on all of them,
from the wall clock over many back-to-back runs of a program of ``--calls``
blocks (each with its own x; jax_marlin.bench.WallTimer), and the share of
device 0's kernel time spent in collectives (NCCL kernels) from a profile.
``--out DIR`` writes the figures as JSON.
"""

import argparse
import datetime
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_marlin as jm
from jax_marlin import bench, sharding


def random_weight(rng, K, N, group_size, dtype):
    G = 1 if group_size is None else K // group_size
    codes = rng.integers(0, 16, (K, N), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, (G, N)).astype(np.float32) / np.sqrt(K) / 4
    return jm.pack(codes, jnp.asarray(scales, dtype))


def mlp(x, gate, up, down):
    h = jax.nn.silu(jm.marlin_matmul(x, gate)) * jm.marlin_matmul(x, up)
    return jm.marlin_matmul(h, down)


def attn_proj(x, q, k, v, o):
    # q's output stands in for the attention output (same shape, head-sharded).
    return jm.marlin_matmul(jm.marlin_matmul(x, q), o), jm.marlin_matmul(x, k), jm.marlin_matmul(x, v)


def mlp_fused(x, gate_up, down, chunk=128):
    # gate and up interleaved in chunks of 128 columns (the Llama model's order):
    # a contiguous column shard holds matching pieces of both.
    gu = jm.marlin_matmul(x, gate_up)
    gu = gu.reshape(*gu.shape[:-1], -1, 2, chunk)
    h = (jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]).reshape(*x.shape[:-1], -1)
    return jm.marlin_matmul(h, down)


def attn_proj_fused(x, qkv, o, head_dim=128):
    # Columns grouped per KV head: [its query heads, k, v]; a shard holds whole groups.
    kv_heads = (qkv.shape[1] - o.shape[0]) // 2 // head_dim
    t = jm.marlin_matmul(x, qkv)
    t = t.reshape(*t.shape[:-1], kv_heads, -1, head_dim)
    q, k, v = t[..., :-2, :], t[..., -2, :], t[..., -1, :]
    return jm.marlin_matmul(q.reshape(*x.shape[:-1], -1), o), k, v


BLOCKS = {
    # name: (function, weights as (K, N) by name, parallel mode of each, output specs:
    # the block's output replicated; k and v stay head-sharded, as attention reads them)
    "mlp": (mlp, lambda d, f, kv: {"gate": (d, f), "up": (d, f), "down": (f, d)},
            {"gate": "column", "up": "column", "down": "row"}, P()),
    "attn": (attn_proj, lambda d, f, kv: {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d)},
             {"q": "column", "k": "column", "v": "column", "o": "row"},
             (P(), P(None, "model"), P(None, "model"))),
    "mlp_fused": (mlp_fused, lambda d, f, kv: {"gate_up": (d, 2 * f), "down": (f, d)},
                  {"gate_up": "column", "down": "row"}, P()),
    "attn_fused": (attn_proj_fused, lambda d, f, kv: {"qkv": (d, d + 2 * kv), "o": (d, d)},
                   {"qkv": "column", "o": "row"},
                   (P(), P(None, "model", None), P(None, "model", None))),
}


def collectives(jitted, *args):
    text = jitted.lower(*args).compile().as_text()
    # Shapes may be tuples with spaces (async or combined collectives): match lazily.
    pattern = (r"= ([^=\n]+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
               r"(?:-start)?\(")
    return [f"{m.group(2)} {m.group(1)}" for m in re.finditer(pattern, text)]


def repeated(block):
    """A program running the block once per x in xs (its own x each: nothing to merge)."""
    return jax.jit(lambda xs, *ws: [block(x, *ws) for x in xs])


def per_block_s(fn, xs, ws, reps=7):
    timer = bench.WallTimer(reps, min_total_s=0.2)
    timer.add("t", fn, (xs, *ws), len(xs))
    return timer.run()["t"]


def collective_share(fn, xs, ws) -> float:
    """Share of device 0's GPU kernel time spent in NCCL kernels, over 3 runs."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(fn(xs, *ws))
        gpu, _ = bench.gpu_and_host_events(bench.load_trace(d))
    if not gpu:
        return float("nan")
    pid0 = min(e["pid"] for e in gpu)  # one device's events
    mine = [e for e in gpu if e["pid"] == pid0]
    nccl = sum(float(e["dur"]) for e in mine if "nccl" in e.get("name", "").lower())
    return nccl / sum(float(e["dur"]) for e in mine)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024, help="model width (embed)")
    ap.add_argument("--f", type=int, default=2048, help="MLP width")
    ap.add_argument("--kv", type=int, default=256, help="k/v projection width (kv heads x head dim)")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64], help="tokens")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--blocks", nargs="+", choices=sorted(BLOCKS),
                    default=["mlp", "mlp_fused", "attn", "attn_fused"])
    ap.add_argument("--time", action="store_true", help="time 1 device vs all devices")
    ap.add_argument("--calls", type=int, default=16, help="blocks a timed program runs")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("model",))
    rng = np.random.default_rng(0)
    print(f"{len(devices)} x {devices[0].device_kind}; d={args.d} f={args.f} kv={args.kv} "
          f"group={args.group} {dtype.name}; partitioner: "
          f"{'Shardy' if jax.config.jax_use_shardy_partitioner else 'GSPMD'}")
    rows = []
    for name in args.blocks:
        block, shapes, modes, specs = BLOCKS[name]
        out = jax.tree.map(lambda p: NamedSharding(mesh, p), specs)
        weights = {k: random_weight(rng, K, N, args.group, dtype)
                   for k, (K, N) in shapes(args.d, args.f, args.kv).items()}
        w1 = [jax.device_put(w, devices[0]) for w in weights.values()]
        wn = [sharding.shard_weight(w, mesh, modes[k], "model") for k, w in weights.items()]
        one = jax.jit(block)
        many = jax.jit(block, out_shardings=out)
        for m in args.m:
            x = jax.device_put(jnp.asarray(rng.standard_normal((m, args.d)), dtype), devices[0])
            xs = jax.device_put(x, NamedSharding(mesh, P()))
            a, b = (np.concatenate([np.asarray(t, np.float32).ravel() for t in jax.tree.leaves(r)])
                    for r in (many(xs, *wn), one(x, *w1)))
            err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            line = f"{name} M={m:4d}: rel. diff sharded vs 1 device {err:.2e}; {collectives(many, xs, *wn)}"
            row = dict(block=name, M=m, rel_diff=err)
            if args.time:
                x1 = [jax.device_put(jnp.asarray(rng.standard_normal((m, args.d)), dtype), devices[0])
                      for _ in range(args.calls)]
                xn = jax.device_put(x1, NamedSharding(mesh, P()))
                f1 = repeated(block)
                fn = jax.jit(lambda xs, *ws: [block(x, *ws) for x in xs],
                             out_shardings=[out] * args.calls)
                t1, tn = per_block_s(f1, x1, w1), per_block_s(fn, xn, wn)
                share = collective_share(fn, xn, wn)
                row.update(one_device_us=t1 * 1e6, n_devices_us=tn * 1e6, speedup=t1 / tn,
                           collective_share=share)
                line += (f"; a block: 1 device {t1 * 1e6:.1f} us, {len(devices)} devices "
                         f"{tn * 1e6:.1f} us ({t1 / tn:.2f}x); collectives {share:.0%} of device 0's kernel time")
            rows.append(row)
            print(line, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = os.path.join(args.out, f"sharded_blocks_{len(devices)}dev_{stamp}.json")
        with open(path, "w") as f:
            json.dump(dict(device=devices[0].device_kind, devices=len(devices), jax=jax.__version__,
                           commit=args.commit or bench.git_commit(), date=stamp, d=args.d, f=args.f,
                           kv=args.kv, group=args.group, dtype=dtype.name, calls=args.calls,
                           partitioner="shardy" if jax.config.jax_use_shardy_partitioner else "gspmd",
                           timing="wall clock over back-to-back runs of a program of `calls` blocks",
                           rows=rows), f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
