"""The large-M dispatch table (jax_marlin.dispatch) and the dense path."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jax_marlin import bench, dispatch, ops
from jax_marlin.ops import marlin_matmul_reference


def test_crossover_is_the_start_of_the_dense_tail():
    assert dispatch.crossover({64: (1, 2), 128: (2, 1.5), 256: (3, 1)}) == 128
    assert dispatch.crossover({64: (1, 2), 128: (1, 2)}) is None
    # A dense win below a kernel win does not count: only the tail does.
    assert dispatch.crossover({64: (1, 0.5), 128: (1, 2), 256: (3, 1)}) == 256


@pytest.fixture
def table(tmp_path, monkeypatch):
    kind = "Test GPU 80GB"
    entries = [
        dict(K=4096, N=4096, dtype="float16", min_m=512),
        dict(K=8192, N=28672, dtype="float16", min_m=256),
        dict(K=8192, N=28672, dtype="bfloat16", min_m=None),
    ]
    (tmp_path / dispatch.table_name(kind)).write_text(json.dumps(dict(device=kind, entries=entries)))
    monkeypatch.setattr(dispatch, "TABLE_DIR", tmp_path)
    dispatch.load_table.cache_clear()
    yield kind
    dispatch.load_table.cache_clear()


def test_table_name():
    assert dispatch.table_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3.json"


def test_use_dense_follows_the_nearest_measured_shape(table):
    assert not dispatch.use_dense(table, 256, 4096, 4096, "float16")
    assert dispatch.use_dense(table, 512, 4096, 4096, "float16")
    assert dispatch.use_dense(table, 300, 8192, 28672, "float16")
    assert dispatch.use_dense(table, 300, 8192, 24576, "float16")  # nearest: 8192 x 28672
    assert not dispatch.use_dense(table, 4096, 8192, 28672, "bfloat16")  # kernel always won
    assert not dispatch.use_dense(table, 4096, 4096, 4096, "bfloat16")  # only that entry: None
    assert not dispatch.use_dense("Unmeasured GPU", 4096, 4096, 4096, "float16")


@pytest.mark.parametrize("group_size", [128, None])
def test_dense_path_matches_reference(group_size, util):
    qw = util.random_weight(5, 256, 192, group_size, jnp.bfloat16)
    x = util.random_x(6, (70, 256), jnp.bfloat16)
    y = ops._dense_call(x, qw.packed, qw.scales)
    assert y.dtype == x.dtype and y.shape == (70, 192)
    assert util.rel_err(y, marlin_matmul_reference(x, qw)) < 1e-2


@pytest.mark.parametrize("dense", [True, False])
def test_cuda_branch_follows_the_table(dense, util, monkeypatch):
    """Traced (not run): the CUDA branch is a dense dot when the table says
    so, the FFI call otherwise."""
    import jax

    from jax_marlin import _ffi

    if not _ffi._ext.has_cuda():
        pytest.skip("this build has no CUDA handler")
    seen = []
    monkeypatch.setattr(dispatch, "use_dense", lambda *a: seen.append(a) or dense)
    qw = util.random_weight(7, 256, 128, 128, jnp.float16)
    x = util.random_x(8, (300 + dense, 256), jnp.float16)  # own shape: no cached trace
    jaxpr = str(jax.make_jaxpr(ops._cuda_call)(x, qw.packed, qw.scales))
    assert seen and seen[0][1:] == (300 + dense, 256, 128, "float16")
    assert ("dot_general" in jaxpr) == dense
    assert ("jax_marlin_matmul" in jaxpr) != dense


def test_sparse_entries_are_separate(table, tmp_path):
    """Entries with "format": "sparse" serve only the sparse path, and the
    dense entries (no format key) only the dense one."""
    path = tmp_path / dispatch.table_name(table)
    data = json.loads(path.read_text())
    data["entries"].append(dict(K=4096, N=4096, dtype="float16", min_m=128, format="sparse"))
    path.write_text(json.dumps(data))
    dispatch.load_table.cache_clear()
    assert dispatch.use_dense(table, 200, 4096, 4096, "float16", fmt="sparse")
    assert not dispatch.use_dense(table, 200, 4096, 4096, "float16")
    assert not dispatch.use_dense(table, 4096, 4096, 4096, "bfloat16", fmt="sparse")


@pytest.mark.parametrize("dense", [True, False])
def test_sparse_cuda_branch_follows_the_table(dense, monkeypatch):
    """Traced (not run): the sparse CUDA branch is dequantize + dot when the
    table says so, the sparse FFI call otherwise."""
    import jax

    import jax_marlin as jm
    from jax_marlin import _ffi

    if not _ffi._ext.has_cuda():
        pytest.skip("this build has no CUDA handler")
    seen = []
    monkeypatch.setattr(dispatch, "use_dense", lambda *a, **kw: seen.append((a, kw)) or dense)
    rng = np.random.default_rng(3)
    sqw = jm.quantize_sparse(jnp.asarray(rng.standard_normal((256, 128), np.float32)), 128,
                             dtype=jnp.float16)
    x = jnp.asarray(rng.standard_normal((310 + dense, 256), np.float32), jnp.float16)
    jaxpr = str(jax.make_jaxpr(ops._sparse_cuda_call)(x, sqw.values, sqw.meta, sqw.scales))
    assert seen and seen[0][0][1:] == (310 + dense, 256, 128, "float16")
    assert seen[0][1] == {"fmt": "sparse"}
    assert ("dot_general" in jaxpr) == dense
    assert ("jax_marlin_sparse_matmul" in jaxpr) != dense


@pytest.mark.gpu
def test_tune_dispatch_entries():
    """The tuning loop times both paths and finds the crossover (tiny shapes)."""
    entries = bench.tune_dispatch([(128, 128)], ["fp16"], reps=1, timer_cls=bench.WallTimer,
                                  batches=(64, 128), formats=("dense", "sparse"))
    assert [e.get("format", "dense") for e in entries] == ["dense", "sparse"]
    for e in entries:
        assert (e["K"], e["N"], e["dtype"]) == (128, 128, "float16")
        assert e["min_m"] in (None, 64, 128)
        assert set(e["us"]) == {"64", "128"}
        assert all(v["kernel"] > 0 and v["dense"] > 0 for v in e["us"].values())


def test_shipped_tables_are_well_formed():
    """Every table in jax_marlin/dispatch_tables/ names its GPU kind in its file name and
    has an entry per dtype for each layer it measured; the H100 one was measured there."""
    tables = sorted(dispatch.TABLE_DIR.glob("*.json"))
    assert any(p.name == "nvidia-h100-80gb-hbm3.json" for p in tables)
    for path in tables:
        table = json.loads(path.read_text())
        assert path.name == dispatch.table_name(table["device"])
        if "borrowed_from" in table:  # a format not measured here borrows the lender's, says why
            assert table["why"]
            own = {dispatch.entry_format(e) for e in table["entries"]}
            lent = {dispatch.entry_format(e) for e in dispatch.load_table(table["borrowed_from"])}
            assert lent - own, "the lender must have entries of a format this table lacks"
        if "withdrawn" in table:  # entries found stale: kept for the record, with the reason
            assert table["withdrawn"]["why"] and table["withdrawn"]["entries"]
            live = {dispatch.entry_key(e) for e in table["entries"]}
            assert not live & {dispatch.entry_key(e) for e in table["withdrawn"]["entries"]}
        for e in table["entries"]:
            assert e["K"] % 64 == 0 and e["N"] % 64 == 0 and e["dtype"] in ("float16", "bfloat16")
            assert e["min_m"] is None or str(e["min_m"]) in e["us"]
            assert e["min_m"] == dispatch.crossover(
                {int(m): (t["kernel"], t["dense"]) for m, t in e["us"].items()})


def test_h100_table_keeps_the_kernel_for_decoding():
    dispatch.load_table.cache_clear()
    kind = "NVIDIA H100 80GB HBM3"
    for K, N in [(4096, 12288), (8192, 28672), (28672, 8192), (8192, 10240)]:
        for dt in ("float16", "bfloat16"):
            assert not any(dispatch.use_dense(kind, M, K, N, dt) for M in (1, 16, 64, 128, 256))


def test_h100_table_was_remeasured_with_the_prefill_kernel():
    """The H100 table's dense-format entries, measured again in session 28
    with the prefill kernel (K split and 64-row tiles from M = 64): the
    kernel beats dequantize + cuBLAS at every M up to 2048 on all 8 Llama
    layers, both dtypes, so no dense-format entry has a crossover. The 2:4
    entries are session 22's (wgmma tiles, before the prefill kernel's 2:4
    form): dense from 512 on 4096^2, 1024 on 8192x10240, 2048 on 4096x12288
    and 11008x4096, never elsewhere."""
    dispatch.load_table.cache_clear()
    kind = "NVIDIA H100 80GB HBM3"
    table = json.loads((dispatch.TABLE_DIR / dispatch.table_name(kind)).read_text())
    assert len(table["entries"]) == 32 and "withdrawn" not in table
    assert table["measured_now"] == 16 and table["carried_over"] == 16

    def dense_from(K, N, dt, fmt="dense"):
        return next((M for M in (128, 256, 512, 1024, 2048, 4096)
                     if dispatch.use_dense(kind, M, K, N, dt, fmt=fmt)), None)

    llama = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096),
             (8192, 10240), (8192, 8192), (8192, 57344), (28672, 8192)]
    for dt in ("float16", "bfloat16"):
        for K, N in llama:
            assert dense_from(K, N, dt) is None
        assert dense_from(4096, 4096, dt, "sparse") == 512
        assert dense_from(8192, 10240, dt, "sparse") == 1024
        assert dense_from(4096, 12288, dt, "sparse") == 2048
        assert dense_from(11008, 4096, dt, "sparse") == 2048
        for K, N in [(8192, 8192), (8192, 57344), (28672, 8192), (4096, 22016)]:
            assert dense_from(K, N, dt, "sparse") is None


def test_a_kind_not_yet_measured_borrows_a_table(table, tmp_path):
    (tmp_path / dispatch.table_name("Other GPU")).write_text(
        json.dumps(dict(device="Other GPU", borrowed_from=table, why="same chip", entries=[])))
    assert dispatch.use_dense("Other GPU", 256, 8192, 28672, "float16")
    assert not dispatch.use_dense("Other GPU", 128, 8192, 28672, "float16")
    assert not dispatch.use_dense("Other GPU", 4096, 8192, 28672, "bfloat16")
    # What was measured on the kind itself (what a new measurement merges with): nothing.
    assert dispatch.load_table("Other GPU") == ()
    assert not dispatch.use_dense("Unknown GPU", 4096, 8192, 28672, "float16")


def test_h200_measured_dense_and_borrows_the_h100_sparse_entries():
    """The H200's dense-format entries were measured there (session 27, the
    prefill kernel from M = 256: the kernel wins up to 1024 on every layer);
    for the 2:4 format, not yet measured with the current kernels, it decides
    by the H100's entries."""
    dispatch.load_table.cache_clear()
    kind, lender = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
    table = json.loads((dispatch.TABLE_DIR / dispatch.table_name(kind)).read_text())
    assert table["borrowed_from"] == lender
    assert {dispatch.entry_format(e) for e in table["entries"]} == {"dense"} and len(table["entries"]) == 16
    assert dispatch.decision_entries(kind, "dense") == list(dispatch.load_table(kind))
    assert dispatch.decision_entries(kind, "sparse") == [
        e for e in dispatch.load_table(lender) if dispatch.entry_format(e) == "sparse"]
    for K, N in [(8192, 28672), (28672, 8192), (8192, 10240)]:
        for dt in ("float16", "bfloat16"):
            assert not any(dispatch.use_dense(kind, M, K, N, dt) for M in (1, 16, 128, 256, 512, 1024))
            assert not dispatch.use_dense(kind, 512, K, N, dt, fmt="sparse")


def test_a_new_measurement_merges_into_the_table():
    old = [dict(K=4096, N=4096, dtype="float16", min_m=128),
           dict(K=4096, N=4096, dtype="bfloat16", min_m=128),
           dict(K=4096, N=4096, dtype="float16", min_m=None, format="sparse")]
    new = [dict(K=4096, N=4096, dtype="float16", min_m=256),
           dict(K=8192, N=8192, dtype="float16", min_m=512, format="sparse")]
    merged = dispatch.merge_entries(old, new)
    assert sorted(map(dispatch.entry_key, merged)) == sorted(
        {dispatch.entry_key(e) for e in old + new})
    by_key = {dispatch.entry_key(e): e["min_m"] for e in merged}
    assert by_key[(4096, 4096, "float16", "dense")] == 256  # the new measurement wins
    assert by_key[(4096, 4096, "bfloat16", "dense")] == 128  # carried over
    assert by_key[(4096, 4096, "float16", "sparse")] is None
