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

CFG = llama.CONFIGS["tiny"]
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int4():
    return llama.quantize_model(llama.random_model(CFG, "dense", jnp.bfloat16, seed=0))


def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in (5, 12, 16, 9)]


def mesh(dp, tp):
    return Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("data", "model"))


def test_sharded_generation_equals_one_device(int4, dp=4, tp=2):
    one = gen.Generator(int4, max_len=48).generate(prompts(), 32, return_logits=True)
    g = gen.Generator(int4, max_len=48, mesh=mesh(dp, tp))
    packed = g.state["layers"][0]["mlp"]["down_proj"]["packed"].get_value()
    assert packed.sharding.spec[0] == "model"  # row parallel: each device holds half of K
    sharded = g.generate(prompts(), 32, return_logits=True)
    c = gen.compare_greedy(one, sharded)
    # Row-parallel partial sums are added in bf16 (one rounding more than on one
    # device): tokens equal, or equal up to a near-tie of the top two logits.
    assert c["ok"], c
    assert c["rows_equal"] >= 2, c


def test_decode_never_gathers_weights(int4):
    """The compiled decode loop's collectives: all-reduces of activations, no all-gather
    of an int4 weight (s32 packed codes)."""
    g = gen.Generator(int4, max_len=48, mesh=mesh(4, 2))
    tokens, pad = gen.pad_prompts(prompts())
    tokens, pad = g._put_batch(tokens), g._put_batch(pad)
    cache = llama.init_cache(CFG, 4, 48, jnp.bfloat16, llama.cache_shardings(CFG, g.mesh))
    logits = jnp.zeros((4, CFG.vocab_size), jnp.float32)
    text = gen._decode.lower(
        g.graphdef, g.state, cache, logits, jnp.int32(16), pad, jax.random.key(0),
        gen.stop_array(()), jnp.int32(0), steps=8, sampling=gen.Sampling(), return_logits=False,
    ).compile().as_text()
    ops = re.findall(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|reduce-scatter|all-to-all)"
                     r"(?:-start)?\(", text)
    # (A (1, 2) s32 all-gather picks the argmax across the vocabulary's shards.)
    gathered = [o for o in ops if o[2] == "all-gather" and o[0] == "s32"
                and np.prod([int(d) for d in o[1].split(",") if d]) >= 1024]
    assert not gathered, ops
    assert any(kind == "all-reduce" for _, _, kind in ops)  # the row-parallel sums


def test_main_job_with_tp(capsys):
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--tp", "2", "--dp", "4", "--new-tokens", "32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "sharded (tp=2, dp=4) vs one device" in out and "FAIL" not in out
