"""The matmul benchmark's bookkeeping on a small layer (any device): rows, byte
counts for the roofline, the 2:4 sparse rows, table and plot."""

from __future__ import annotations

import pytest

from jax_marlin import bench


def test_byte_counts():
    # 4096 x 4096, g128: packed K N / 2, scales 32 x N x 2 bytes, x and y at M = 1.
    assert bench.marlin_bytes(1, 4096, 4096, 128) == 4096 * 4096 // 2 + 32 * 4096 * 2 + 2 * 4096 * 2
    # 2:4 sparse: values K N / 4 + metadata K N / 8 (0.375 bytes a weight), same scales, x, y.
    assert (bench.sparse_bytes(1, 4096, 4096, 128) - 32 * 4096 * 2 - 2 * 4096 * 2
            == 4096 * 4096 * 3 // 8)


def test_device_timers_count_a_run():
    # Three kernels of one run, with a 2 us gap and two overlapping: the
    # profiler timer sums durations, the span timer takes first start to last end.
    run = [dict(ts=100.0, dur=5.0), dict(ts=107.0, dur=4.0), dict(ts=108.0, dur=1.0)]
    assert bench.DeviceTimer.run_time(run) == 10.0
    assert bench.SpanTimer.run_time(run) == 11.0  # 100 .. 111
    gap_only = [dict(ts=0.0, dur=1.0), dict(ts=3.0, dur=1.0)]
    assert bench.DeviceTimer.run_time(gap_only) == 2.0
    assert bench.SpanTimer.run_time(gap_only) == 4.0


@pytest.fixture(scope="module")
def sparse_rows():
    return bench.bench_layer(128, 128, "fp16", (1, 3), reps=1, timer_cls=bench.WallTimer, sparse=True)


def test_layer_rows_with_sparse(sparse_rows):
    rows = [dict(r) for r in sparse_rows]
    assert [(r["M"], r["group"]) for r in rows] == [(1, 128), (1, "channel"), (3, 128), (3, "channel")]
    for r in rows:
        r["set"] = "tiny"
    rows = bench.summarize(rows, bw=1e12)
    for r in rows:
        assert r["marlin_s"] > 0 and r["sparse_s"] > 0
        assert r["sparse_speedup_vs_marlin"] == pytest.approx(r["marlin_s"] / r["sparse_s"])
        assert r["sparse_roofline_frac"] == pytest.approx(r["sparse_bytes"] / 1e12 / r["sparse_s"])
    bench.print_table(rows)


def test_plot_with_sparse_rows(sparse_rows, tmp_path):
    pytest.importorskip("matplotlib")
    rows = bench.summarize([dict(r, set="tiny") for r in sparse_rows], bw=1e12)
    bench.plot(rows, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_a_run_cut_short_keeps_its_rows(tmp_path, monkeypatch):
    """The JSON is rewritten after every layer: a run that dies part way (here the
    second layer fails) leaves the rows it measured, marked incomplete."""
    import json

    monkeypatch.setitem(bench.LAYER_SETS, "tiny", [(128, 128), (128, 192)])
    monkeypatch.setattr(bench, "measure_copy_bandwidth", lambda timer_cls: 1e11)
    real = bench.bench_layer

    def failing_layer(K, N, *args):
        if N == 192:
            raise RuntimeError("cut off")
        return real(K, N, *args)

    monkeypatch.setattr(bench, "bench_layer", failing_layer)
    monkeypatch.setenv("JAX_MARLIN_PDL", "0")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with pytest.raises(RuntimeError, match="cut off"):
        bench.main(["--sets", "tiny", "--dtypes", "fp16", "--batches", "1", "--reps", "1",
                    "--timer", "wall", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("bench_full_*.json")
    saved = json.loads(path.read_text())
    assert not saved["complete"]
    assert [(r["K"], r["N"], r["M"]) for r in saved["rows"]] == [(128, 128, 1)] * 2
    # The variables that change what is measured are in the file.
    assert saved["environment"] == {"JAX_MARLIN_PDL": "0"}


def test_tune_formats_are_checked_before_measuring(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--tune-dispatch", "--formats", "sparse,int8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--formats: each of ['dense', 'sparse'], got 'sparse,int8'" in err


def test_combine_lets_a_later_run_supersede_rows(tmp_path):
    """--combine merges runs of one device; a row measured again in a later file
    (a re-run of some M after a kernel change) replaces the earlier one."""
    import json

    def row(M, marlin_s):
        return dict(set="tiny", K=128, N=128, M=M, dtype="fp16", group=128, marlin_s=marlin_s,
                    dense_s=2e-6, xla_int4_s=4e-6, bytes=10_000, roofline_s=5e-7,
                    roofline_frac=5e-7 / marlin_s, speedup_vs_dense=2e-6 / marlin_s,
                    speedup_vs_xla_int4=4e-6 / marlin_s)

    def result(commit, date, rows):
        return dict(device="GPU X", platform="gpu", jax="0", commit=commit, date=date,
                    copy_bandwidth_Bps=1e12, timing="wall", rows=rows)

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(result("aaa", "20260101T000000Z", [row(1, 1e-6), row(64, 4e-6)])))
    new.write_text(json.dumps(result("bbb", "20260102T000000Z", [row(64, 2e-6)])))
    merged = json.loads(open(bench.combine([str(old), str(new)], str(tmp_path / "out"))).read())
    assert [(r["M"], r["marlin_s"], r["commit"]) for r in merged["rows"]] == [
        (1, 1e-6, "aaa"), (64, 2e-6, "bbb")]
    assert merged["commit"] == "aaa,bbb" and merged["date"] == "20260102T000000Z"
    # A combined file combines again (its list fields flatten).
    newest = tmp_path / "newest.json"
    newest.write_text(json.dumps(result("ccc", "20260104T000000Z", [row(1, 0.5e-6)])))
    first = bench.combine([str(old), str(new)], str(tmp_path / "out1"))
    again = json.loads(open(bench.combine([first, str(newest)], str(tmp_path / "out2"))).read())
    assert sorted((r["M"], r["marlin_s"], r["commit"]) for r in again["rows"]) == [
        (1, 0.5e-6, "ccc"), (64, 2e-6, "bbb")]
    assert again["commit"] == "aaa,bbb,ccc" and again["timing"] == ["wall"]
    assert again["copy_bandwidth_Bps"] == [1e12] * 3
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(result("ccc", "20260103T000000Z", []), device="GPU Y")))
    with pytest.raises(SystemExit, match="different devices"):
        bench.combine([str(old), str(other)], str(tmp_path / "out"))
