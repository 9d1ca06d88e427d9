"""Sharding: slices of the packed format, the rule tables, and the 8-device run.

The tests that need 8 devices are in tests/multidevice_sharding.py. XLA fixes
the device count when jax initialises, which conftest.py has done with one
CPU device for this process, so ``test_sharding_on_8_cpu_devices`` runs that
file in a fresh ``python -m pytest`` process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and ``JAX_PLATFORMS=cpu``
(CPU even on a GPU machine: the partitioning is what is tested).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_marlin as jm
from jax_marlin import layout, sharding



def test_sharding_on_8_cpu_devices(util):
    util.run_on_8_cpu_devices("multidevice_sharding.py")


# --- FORMAT.md: shards of a packed weight are packed weights ---------------------


def _codes_scales(K, N, G, seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (K, N), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.5, (G, N)).astype(np.float16)
    return codes, scales


@pytest.mark.parametrize("G", [4, 1], ids=["grouped", "per_channel"])
def test_column_slices_are_packed_weights(G):
    """A slice of 64-multiple columns: packed[:, 2a:2b], scales[:, a:b] (both permutations)."""
    K, N = 256, 384
    codes, scales = _codes_scales(K, N, G)
    qw = jm.pack(codes, scales)
    for a, b in [(0, 64), (64, 192), (128, 384), (320, 384)]:
        part = jm.pack(codes[:, a:b], scales[:, a:b])
        np.testing.assert_array_equal(qw.packed[:, 2 * a:2 * b], part.packed)
        np.testing.assert_array_equal(qw.scales[:, a:b], part.scales)


def test_row_slices_are_packed_weights():
    """Whole groups of rows: packed[a/16:b/16], scales[a/g:b/g].

    A slice of exactly one group needs its scales reordered.
    """
    K, N, g = 512, 128, 64
    codes, scales = _codes_scales(K, N, K // g)
    qw = jm.pack(codes, scales)
    for a, b in [(0, 128), (128, 512), (256, 384)]:
        part = jm.pack(codes[a:b], scales[a // g:b // g])
        np.testing.assert_array_equal(qw.packed[a // 16:b // 16], part.packed)
        np.testing.assert_array_equal(qw.scales[a // g:b // g], part.scales)
    # A slice of exactly one group has one scale row: the per-channel layout,
    # whose scale order differs from the grouped one.
    part = jm.pack(codes[64:128], scales[1:2])
    np.testing.assert_array_equal(qw.packed[4:8], part.packed)
    assert not np.array_equal(qw.scales[1:2], part.scales)
    np.testing.assert_array_equal(layout.grouped_scales_as_per_channel(qw.scales[1:2]),
                                  part.scales)


# --- weight_specs and the logical-axis table -------------------------------------


def test_weight_specs(util):
    grouped = util.random_weight(0, 256, 128, 64, jnp.float16)
    per_channel = util.random_weight(0, 256, 128, None, jnp.float16)
    assert sharding.weight_specs(grouped, "column", "model") == jm.QuantizedWeight(
        packed=P(None, "model"), scales=P(None, "model"))
    assert sharding.weight_specs(grouped, "row", ("data", "model")) == jm.QuantizedWeight(
        packed=P(("data", "model"), None), scales=P(("data", "model"), None))
    assert sharding.weight_specs(per_channel, "row", "model").scales == P(None, None)
    assert sharding.weight_specs(grouped, "replicated").packed == P(None, None)
    with pytest.raises(ValueError, match="needs a mesh axis"):
        sharding.weight_specs(grouped, "column")
    with pytest.raises(ValueError, match="mode must be one of"):
        sharding.weight_specs(grouped, "rows", "model")


def test_weight_specs_sparse():
    """The 2:4 sparse weight: values, meta and scales split alike (per-channel scales
    replicated in row mode), as a SparseQuantizedWeight of specs."""
    rng = np.random.default_rng(0)
    grouped = jm.quantize_sparse(rng.standard_normal((256, 128)).astype(np.float32), 64)
    per_channel = jm.quantize_sparse(rng.standard_normal((256, 128)).astype(np.float32), None)
    assert sharding.weight_specs(grouped, "column", "model") == jm.SparseQuantizedWeight(
        values=P(None, "model"), meta=P(None, "model"), scales=P(None, "model"))
    assert sharding.weight_specs(grouped, "row", ("data", "model")) == jm.SparseQuantizedWeight(
        values=P(("data", "model"), None), meta=P(("data", "model"), None),
        scales=P(("data", "model"), None))
    row_pc = sharding.weight_specs(per_channel, "row", "model")
    assert (row_pc.meta, row_pc.scales) == (P("model", None), P(None, None))
    down = sharding.logical_weight_specs(sharding.LLAMA_PROJECTIONS["down_proj"], sparsity="2:4")
    assert down == jm.SparseQuantizedWeight(values=P("model", None), meta=P("model", None),
                                            scales=P("model", None))
    with pytest.raises(ValueError, match="sparsity"):
        sharding.logical_weight_specs(("embed", "mlp"), sparsity="1:2")


def test_llama_rule_table():
    modes = {name: sharding.projection_mode(axes)
             for name, axes in sharding.LLAMA_PROJECTIONS.items()}
    assert modes == {"q_proj": "column", "k_proj": "column", "v_proj": "column",
                     "o_proj": "row", "gate_proj": "column", "up_proj": "column",
                     "down_proj": "row", "qkv_proj": "column", "gate_up_proj": "column"}
    down = sharding.logical_weight_specs(sharding.LLAMA_PROJECTIONS["down_proj"])
    assert down == jm.QuantizedWeight(packed=P("model", None), scales=P("model", None))
    down_pc = sharding.logical_weight_specs(sharding.LLAMA_PROJECTIONS["down_proj"],
                                            per_channel=True)
    assert down_pc.scales == P(None, None)
    up = sharding.logical_weight_specs(sharding.LLAMA_PROJECTIONS["up_proj"])
    assert up == jm.QuantizedWeight(packed=P(None, "model"), scales=P(None, "model"))
    # Other rules, e.g. no tensor parallelism: everything replicated.
    assert sharding.projection_mode(("embed", "mlp"), rules=(("mlp", None),)) == "replicated"


def test_sharded_blocks_example_on_2_cpu_devices(tmp_path):
    """examples/sharded_mlp.py (every block, separate and fused projections) on 2 CPU
    devices: each matches one device and needs exactly one all-reduce of its output."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([sys.executable, str(root / "examples" / "sharded_mlp.py"), "--m", "1", "5"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    rows = [line for line in run.stdout.splitlines() if " M=" in line]
    assert len(rows) == 8, run.stdout
    for line in rows:
        err = float(line.split("rel. diff sharded vs 1 device ")[1].split(";")[0])
        assert err < 2e-3, line
        collectives = line.split("; ", 1)[1]
        assert collectives.count("all-reduce") == 1 and "all-gather" not in collectives, line
