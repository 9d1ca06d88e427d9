"""scripts/ab_compare.py, the A/B comparison of self-test benchmark logs: it
pairs rows across variants and rounds and reports each variant's change."""

from __future__ import annotations

DENSE_HEADER = ("copy bandwidth (read + write): 3.932 TB/s\n"
                "     K      N     M group    us/call    roof_us   roof%\n")


def write(path, rows):
    path.write_text(DENSE_HEADER + "".join(
        f"{k:6d} {n:6d} {m:5d} {g:>5} {us:10.2f} {2.2:10.2f} {24:6d}%\n" for k, n, m, g, us in rows))


def test_changes_against_main(tmp_path, capsys, util):
    write(tmp_path / "bench_marlin_selftest_main_r1.log", [(4096, 4096, 1, "128", 10.0), (4096, 4096, 16, "ch", 12.0)])
    write(tmp_path / "bench_marlin_selftest_main_r2.log", [(4096, 4096, 1, "128", 10.0), (4096, 4096, 16, "ch", 12.0)])
    write(tmp_path / "bench_marlin_selftest_cand_x_r1.log", [(4096, 4096, 1, "128", 7.0), (4096, 4096, 16, "ch", 12.1)])
    write(tmp_path / "bench_marlin_selftest_cand_x_r2.log", [(4096, 4096, 1, "128", 9.0), (4096, 4096, 16, "ch", 12.1)])
    util.load_script("ab_compare").main([str(tmp_path)])
    out = capsys.readouterr().out
    lines = {tuple(line.split()[:4]): line for line in out.splitlines() if line.strip().startswith("4096")}
    # Mean of the two rounds (8.0) against main's 10.0: -20%, past the threshold.
    assert "-20.0%" in lines[("4096", "4096", "1", "128")]
    assert lines[("4096", "4096", "1", "128")].endswith("*")
    # +0.8%: within it, unmarked. The variant's name may hold underscores.
    assert "+0.8%" in lines[("4096", "4096", "16", "ch")]
    assert not lines[("4096", "4096", "16", "ch")].endswith("*")
    assert "cand_x" in out
