"""A tensor-parallel Llama MLP block with 4-bit weights, over all devices.

    python examples/sharded_mlp.py                     # small block, checks + collectives
    python examples/sharded_mlp.py --d 8192 --f 28672 --time   # Llama-70B-sized, timed
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python examples/sharded_mlp.py                 # 8 fake CPU devices

gate and up are column parallel, down row parallel (jax_marlin.sharding's
LLAMA_PROJECTIONS): each device holds 1/n of every weight, and the block
needs one all-reduce of its output. The sharded result is checked against
the one-device one; the compiled module's collectives are listed.
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_marlin as jm
from jax_marlin import sharding


def random_weight(rng, K, N, group_size, dtype):
    G = 1 if group_size is None else K // group_size
    codes = rng.integers(0, 16, (K, N), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, (G, N)).astype(np.float32) / np.sqrt(K) / 4
    return jm.pack(codes, jnp.asarray(scales, dtype))


def mlp(x, gate, up, down):
    h = jax.nn.silu(jm.marlin_matmul(x, gate)) * jm.marlin_matmul(x, up)
    return jm.marlin_matmul(h, down)


def collectives(jitted, *args):
    text = jitted.lower(*args).compile().as_text()
    pattern = r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\("
    return [f"{m.group(2)} {m.group(1)}" for m in re.finditer(pattern, text)]


def time_call(f, *args, iters=50):
    """Median wall-clock seconds of one call (after warm-up)."""
    for _ in range(3):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1024, help="model width (embed)")
    ap.add_argument("--f", type=int, default=2048, help="MLP width")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64], help="tokens")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--time", action="store_true", help="time 1 device vs all devices")
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("model",))
    rng = np.random.default_rng(0)
    weights = {
        "gate": random_weight(rng, args.d, args.f, args.group, dtype),
        "up": random_weight(rng, args.d, args.f, args.group, dtype),
        "down": random_weight(rng, args.f, args.d, args.group, dtype),
    }
    modes = {"gate": "column", "up": "column", "down": "row"}
    sharded = {k: sharding.shard_weight(w, mesh, modes[k], "model") for k, w in weights.items()}
    print(f"{len(devices)} x {devices[0].device_kind}; d={args.d} f={args.f} "
          f"group={args.group} {dtype.name}; partitioner: "
          f"{'Shardy' if jax.config.jax_use_shardy_partitioner else 'GSPMD'}")

    one = jax.jit(mlp)
    many = jax.jit(mlp, out_shardings=NamedSharding(mesh, P()))
    for m in args.m:
        x = jax.device_put(jnp.asarray(rng.standard_normal((m, args.d)), dtype), devices[0])
        xs = jax.device_put(x, NamedSharding(mesh, P()))
        w1 = [jax.device_put(weights[k], devices[0]) for k in ("gate", "up", "down")]
        wn = [sharded[k] for k in ("gate", "up", "down")]
        y1, yn = one(x, *w1), many(xs, *wn)
        a, b = np.asarray(yn, np.float32), np.asarray(y1, np.float32)
        err = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        line = f"M={m:4d}: rel. diff sharded vs 1 device {err:.2e}; {collectives(many, xs, *wn)}"
        if args.time:
            t1, tn = time_call(one, x, *w1), time_call(many, xs, *wn)
            line += (f"; wall time a block: 1 device {t1 * 1e6:.1f} us, "
                     f"{len(devices)} devices {tn * 1e6:.1f} us ({t1 / tn:.2f}x)")
        print(line)


if __name__ == "__main__":
    main()
