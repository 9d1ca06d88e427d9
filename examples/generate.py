"""Generate text with a 4-bit Llama-style decoder and compare it with the same model in bf16.

    python examples/generate.py                          # tiny model on CPU (under a minute)
    python examples/generate.py --config llama2-7b       # Llama-2-7B shapes (GPU), random weights
    python examples/generate.py --config llama2-7b --tp 2          # tensor parallel over 2 devices
    python examples/generate.py --checkpoint DIR         # a Hugging Face Llama checkpoint
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python examples/generate.py --tp 2 --dp 4        # 8 fake CPU devices

The bf16 model has nnx.Linear projections; the int4 model is the same code
with jax_marlin.QuantDense layers holding the bf16 weights quantized to 4 bits
(round to nearest, group 128) by jax_marlin.quantize_params. Both generate
for a batch of prompts of different lengths (left-padded) in a compiled
prefill and a compiled while_loop decode (jax_marlin.models.generate).

Printed: decode tokens/s of both (second run: compilation excluded), and the
check that the int4 model computes what it should:
  * against a bf16 model holding its dequantized weights: greedy tokens must
    be equal and logits nearly so (the kernel's arithmetic only);
  * against the original bf16 weights: the 4-bit quantization error, as a
    relative logit error and the share of equal greedy tokens.
With --tp, the sharded int4 generation is also compared with one device's.
The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jax_marlin as jm

from jax_marlin.models import generate as gen
from jax_marlin.models import llama


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", choices=sorted(llama.CONFIGS), default=None,
                    help="model shapes (default: tiny on CPU, llama2-7b on GPU)")
    ap.add_argument("--layers", type=int, default=None, help="use only this many layers")
    ap.add_argument("--checkpoint", default=None, help="Hugging Face Llama checkpoint directory")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--group-size", type=int, default=128, help="0: per-channel")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16, help="longest prompt (others shorter)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--stop", type=int, nargs="*", default=[], help="stop token ids")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (mesh axis 'model')")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel devices (mesh axis 'data')")
    return ap.parse_args(argv)


def make_models(args):
    """(bf16 model, int4 model, description)."""
    dtype = jnp.dtype(args.dtype)
    group = args.group_size or None
    if args.checkpoint:
        from jax_marlin.models import hf

        t0 = time.perf_counter()
        model = hf.load_llama(args.checkpoint, quantize=None, dtype=dtype)
        if isinstance(model.layers[0].mlp.down_proj, jm.QuantDense):  # a GPTQ checkpoint: 4-bit already
            int4, bf16 = model, llama.dequantized_model(model)
        else:
            bf16, int4 = model, llama.quantize_model(model, group)
        return bf16, int4, f"weights from {args.checkpoint} ({time.perf_counter() - t0:.1f} s to load)"
    cfg = llama.CONFIGS[args.config]
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    bf16 = llama.random_model(cfg, "dense", dtype, seed=args.seed)
    int4 = llama.quantize_model(bf16, group)
    return bf16, int4, "random weights (a speed and consistency check, not a trained model)"


def prompts_for(args, vocab):
    rng = np.random.default_rng(args.seed)
    lengths = np.linspace(max(1, args.prompt_len // 3), args.prompt_len, args.batch).astype(int)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_twice(generator, prompts, args, **kw):
    """Generate twice; the second run's times exclude compilation."""
    opts = dict(sampling=gen.Sampling(args.temperature, args.top_k, args.top_p),
                stop_tokens=args.stop, seed=args.seed, **kw)
    generator.generate(prompts, args.new_tokens, **opts)
    return generator.generate(prompts, args.new_tokens, **opts)


def main(argv=None) -> int:
    args = parse_args(argv)
    backend = jax.default_backend()
    if args.config is None and not args.checkpoint:
        args.config = "tiny" if backend == "cpu" else "llama2-7b"
    n_dev = args.tp * args.dp
    if n_dev > jax.device_count():
        sys.exit(f"--tp {args.tp} --dp {args.dp} needs {n_dev} devices; jax sees "
                 f"{jax.device_count()}. On CPU, fake devices: "
                 f"XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} JAX_PLATFORMS=cpu")
    if args.batch % args.dp:
        sys.exit(f"--batch {args.batch} must be a multiple of --dp {args.dp}.")

    def check_tp(cfg):
        try:
            llama.check_tensor_parallel(cfg, args.tp, args.group_size or None)
        except ValueError as e:
            sys.exit(str(e))

    if not args.checkpoint:  # before building anything
        check_tp(llama.CONFIGS[args.config].replace(n_layers=args.layers or 1))
    t0 = time.perf_counter()
    bf16, int4, origin = make_models(args)
    cfg = bf16.cfg
    check_tp(cfg)
    mesh = None
    if n_dev > 1:
        mesh = Mesh(np.array(jax.devices()[:n_dev]).reshape(args.dp, args.tp), ("data", "model"))
    prompts = prompts_for(args, cfg.vocab_size)
    P = -(-max(map(len, prompts)) // 16) * 16
    max_len = P + args.new_tokens

    dev = jax.devices()[0]
    print(f"model: {args.config or 'checkpoint'} shapes, {cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, ffn {cfg.ffn_dim}, vocab "
          f"{cfg.vocab_size}: {cfg.n_params() / 1e6:.1f}M parameters; {origin}")
    print(f"devices: {n_dev} x {dev.device_kind} ({backend})"
          + (f", mesh data={args.dp} x model={args.tp}" if mesh else "")
          + f"; {args.dtype}, group size {args.group_size or 'per-channel'}; "
          f"weights int4 {llama.count_bytes(_params(int4)) / 2**20:.1f} MiB vs bf16 "
          f"{llama.count_bytes(_params(bf16)) / 2**20:.1f} MiB; built in {time.perf_counter() - t0:.1f} s")
    print(f"batch of {args.batch} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens (padded to {P}), {args.new_tokens} new tokens, "
          + ("greedy" if args.temperature == 0 else
             f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}"))

    results = {}
    for name, model in (("int4", int4), ("bf16", bf16)):
        g = gen.Generator(model, max_len=max_len, mesh=mesh)
        results[name] = (g, run_twice(g, prompts, args))
    print(f"{'':6}{'prefill ms':>12}{'decode tok/s':>14}{'ms/step':>9}")
    for name, (_, r) in results.items():
        print(f"{name:6}{r.prefill_s * 1e3:>12.1f}{r.decode_tokens_per_s:>14.1f}"
              f"{r.decode_s / max(r.decode_steps, 1) * 1e3:>9.2f}")
    speed = results["int4"][1].decode_tokens_per_s / results["bf16"][1].decode_tokens_per_s
    print(f"int4 / bf16 decode speed: {speed:.2f}x"
          + (" (the CPU kernel is a portable reference, not tuned for speed)" if backend == "cpu" else ""))

    # Checks run greedy (whatever --temperature) and keep the logits.
    def checked(generator):
        return generator.generate(prompts, args.new_tokens, stop_tokens=args.stop,
                                  return_logits=True)

    def verdict(c):
        equal = ("all rows equal" if c["rows_equal"] == args.batch else
                 f"{c['rows_equal']}/{args.batch} rows equal, the others up to a near-tie "
                 f"(first difference at steps {c['first_difference']})")
        return (f"greedy tokens: {equal}; max logit diff {c['max_logit_diff']:.3g} "
                f"(tolerance {c['tol']:.3g}) -> {'PASS' if c['ok'] else 'FAIL'}")

    ok = True
    g4 = results["int4"][0]
    ref4 = checked(g4)
    print("checks (greedy):")
    if cfg.n_params() < 1e10:
        twin = gen.Generator(llama.dequantized_model(int4), max_len=max_len, mesh=mesh)
        c = gen.compare_greedy(ref4, checked(twin))
        ok &= c["ok"]
        print(f"  int4 vs bf16 holding the dequantized int4 weights: {verdict(c)}")
    if mesh is not None and cfg.n_params() < 1e9:
        c = gen.compare_greedy(checked(gen.Generator(int4, max_len=max_len)), ref4)
        ok &= c["ok"]
        print(f"  int4 sharded (tp={args.tp}, dp={args.dp}) vs one device: {verdict(c)}")
    tokens, pad = gen.pad_prompts(prompts)
    full = np.concatenate([tokens, ref4.tokens[:, :-1]], axis=1)  # teacher forcing on int4's output
    real = np.arange(full.shape[1])[None, :] >= pad[:, None]
    err = rel(g4.logits(full, pad)[real], results["bf16"][0].logits(full, pad)[real])
    rb = checked(results["bf16"][0])
    agree = float(np.mean(rb.tokens == ref4.tokens))
    print(f"  int4 vs the original bf16 weights (the 4-bit quantization error, reported): logit "
          f"rel. error {err:.2e} teacher-forced over {int(real.sum())} positions; generated tokens "
          f"equal {100 * agree:.0f}%")
    print(f"int4 tokens, row 0: {results['int4'][1].sequences()[0]}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


def _params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


if __name__ == "__main__":
    sys.exit(main())
