"""Tensor-parallel generation of the tiny Llama on 8 CPU devices.

Run by tests/test_llama.py in its own process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu`` (the
name does not start with ``test_``, so the main run does not collect it).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jax_marlin.models import generate as gen
from jax_marlin.models import llama

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

CFG = llama.CONFIGS["tiny"]  # fused projections (the default)
# tiny's 2 KV heads allow tp <= 2; this variant's 8 KV heads (and F/8 = 128,
# one gate/up chunk pair per device) allow tp = 8, with group 64 for the
# row-parallel shards (512 / 8 = 64 rows of o_proj each).
WIDE = CFG.replace(n_heads=16, n_kv_heads=8, head_dim=32, ffn_dim=1024)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int4():
    return llama.quantize_model(llama.random_model(CFG, "dense", jnp.bfloat16, seed=0))


@pytest.fixture(scope="module")
def wide_int4():
    return llama.quantize_model(llama.random_model(WIDE, "dense", jnp.bfloat16, seed=1), 64)


def prompts(n=4):
    rng = np.random.default_rng(0)
    return [rng.integers(3, CFG.vocab_size, k).tolist() for k in (5, 12, 16, 9, 3, 14, 7, 1)[:n]]


def mesh(dp, tp):
    return Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("data", "model"))


def check_sharded_generation(model, dp, tp, n_prompts=4):
    one = gen.Generator(model, max_len=48).generate(prompts(n_prompts), 32, return_logits=True)
    g = gen.Generator(model, max_len=48, mesh=mesh(dp, tp))
    layer = g.state["layers"][0]
    packed = layer["mlp"]["down_proj"]["packed"].get_value()
    assert packed.sharding.spec[0] == "model"  # row parallel: each device holds 1/tp of K
    qkv = layer["attn"]["qkv_proj"]["packed"].get_value()  # column parallel: 1/tp of N
    assert tuple(qkv.sharding.spec) == (None, "model"), qkv.sharding
    assert qkv.addressable_shards[0].data.shape[1] == qkv.shape[1] // tp
    sharded = g.generate(prompts(n_prompts), 32, return_logits=True)
    c = gen.compare_greedy(one, sharded)
    # Row-parallel partial sums are added in bf16 (one rounding more than on one
    # device): tokens equal, or equal up to a near-tie of the top two logits.
    assert c["ok"], c
    assert c["rows_equal"] >= n_prompts // 2, c


@pytest.mark.parametrize("tp", sorted({2, llama.max_tensor_parallel(CFG, 8)}))
def test_sharded_generation_equals_one_device(int4, tp):
    check_sharded_generation(int4, 8 // tp, tp)


def test_sharded_generation_tp8(wide_int4):
    llama.check_tensor_parallel(WIDE, 8, group_size=64)
    check_sharded_generation(wide_int4, 1, 8, n_prompts=2)


def test_bad_tensor_parallel_is_refused(int4):
    """tp = 4 would cut tiny's KV-head groups (qkv_proj) in half: a clear error, not a
    silently communicating program."""
    with pytest.raises(ValueError, match="n_kv_heads=2 must both be multiples of tp=4"):
        gen.Generator(int4, max_len=48, mesh=mesh(2, 4))


def decode_collectives(model, dp, tp, batch=4):
    """The collectives of the compiled decode loop: [(dtype, per-device shape, kind)]."""
    cfg = model.cfg
    g = gen.Generator(model, max_len=48, mesh=mesh(dp, tp))
    _, pad = gen.pad_prompts(prompts(batch))
    pad = g._put_batch(pad)
    cache = llama.init_cache(cfg, batch, 48, jnp.bfloat16, llama.cache_shardings(cfg, g.mesh))
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    text = gen._decode.lower(
        g.graphdef, g.state, cache, logits, jnp.int32(16), pad, jax.random.key(0),
        gen.stop_array(()), jnp.int32(0), steps=8, sampling=gen.Sampling(), return_logits=False,
    ).compile().as_text()
    ops = re.findall(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all"
                     r"|collective-permute)(?:-start)?\(", text)
    return [(dtype, tuple(int(d) for d in shape.split(",") if d), kind) for dtype, shape, kind in ops]


@pytest.mark.parametrize("which", ["tiny", "wide"])
def test_decode_communicates_only_row_parallel_sums(which, int4, wide_int4):
    """The compiled decode loop's collectives: all-reduces of activations (after o_proj
    and down_proj), no all-gather of an int4 weight (s32 packed codes), and nothing
    moving activations between devices: the fused qkv_proj / gate_up_proj column
    orders give each device whole KV-head groups and whole gate/up chunk pairs.
    (An order that cut them, e.g. [all q | all k | all v], adds collective-permutes.)"""
    model, dp, tp, batch = (int4, 4, 2, 4) if which == "tiny" else (wide_int4, 1, 8, 2)
    ops = decode_collectives(model, dp, tp, batch)
    kinds = {kind for _, _, kind in ops}
    assert kinds <= {"all-reduce", "all-gather"}, ops
    # (Small all-gathers pick the argmax across the vocabulary's shards.)
    gathered = [o for o in ops if o[2] == "all-gather" and np.prod(o[1]) > batch // dp * tp]
    assert not gathered, ops
    sums = [o for o in ops if o[2] == "all-reduce" and o[1] and o[1][-1] == model.cfg.dim]
    # Two a layer (o_proj, down_proj), one for the vocabulary-sharded embedding.
    assert 2 * model.cfg.n_layers <= len(sums) <= 2 * model.cfg.n_layers + 1, ops


def test_main_job_with_tp(capsys):
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--tp", "2", "--dp", "4", "--new-tokens", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sharded (tp=2, dp=4) vs one device" in out and "FAIL" not in out
