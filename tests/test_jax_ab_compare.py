"""scripts/jax_ab_compare.py, the comparison of a JAX-level A/B run
(scripts/jax_ab.sh): medians over rounds, changes against "new", the
`jnp.dot` column, variants missing a row."""

from __future__ import annotations

import json


def write(folder, rows):
    """One benchmark JSON in `folder`; rows are (K, N, M, group, marlin_us, dense_us)."""
    folder.mkdir()
    result = dict(rows=[dict(K=k, N=n, M=m, dtype="fp16", group=g, marlin_s=t * 1e-6, dense_s=d * 1e-6)
                        for k, n, m, g, t, d in rows])
    (folder / "bench_full_20261206T000000Z.json").write_text(json.dumps(result))


def row(out, section, key):
    """The line of `section` (0: Marlin, 1: jnp.dot) that starts with `key`."""
    tables = out.split("jnp.dot (16-bit weight)")
    for line in tables[section].splitlines():
        if line.split()[:5] == key:
            return line
    raise AssertionError(f"no row {key} in section {section}:\n{out}")


def test_medians_and_changes(tmp_path, capsys, util):
    write(tmp_path / "new_r1", [(4096, 4096, 1, 128, 8.0, 10.0), (4096, 4096, 1, "channel", 9.0, 10.0)])
    write(tmp_path / "new_r2", [(4096, 4096, 1, 128, 10.0, 12.0), (4096, 4096, 1, "channel", 9.0, 10.0)])
    write(tmp_path / "new_r3", [(4096, 4096, 1, 128, 12.0, 11.0), (4096, 4096, 1, "channel", 9.0, 10.0)])
    # "old" has one round and no per-channel row.
    write(tmp_path / "old_r1", [(4096, 4096, 1, 128, 9.0, 11.0)])
    (tmp_path / "flags.txt").write_text("flags1: --xla_example=1\n")
    write(tmp_path / "flags1_r1", [(4096, 4096, 1, 128, 7.5, 11.0), (4096, 4096, 1, "channel", 9.9, 11.0)])
    assert util.load_script("jax_ab_compare").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "flags1: --xla_example=1" in out
    header = next(line for line in out.splitlines() if line.split()[:1] == ["K"])
    assert header.split()[5:] == ["new", "flags1", "old"]  # "new" first, the others by name
    # new: median of 8, 10, 12 = 10; flags1 7.5 (-25%); old 9 (-10%).
    g128 = row(out, 0, ["4096", "4096", "1", "fp16", "128"])
    assert "10.00" in g128 and "7.50 (-25.0%)" in g128 and "9.00 (-10.0%)" in g128
    channel = row(out, 0, ["4096", "4096", "1", "fp16", "channel"])
    assert "9.90 (+10.0%)" in channel and channel.rstrip().endswith("-")  # old has no such row
    # jnp.dot: new's median is 11; old and flags1 +0.0%.
    dot = row(out, 1, ["4096", "4096", "1", "fp16", "128"])
    assert "11.00" in dot and dot.count("( +0.0%)") == 2


def test_no_results(tmp_path, capsys, util):
    (tmp_path / "notes").mkdir()
    assert util.load_script("jax_ab_compare").main([str(tmp_path)]) == 1
    assert "no <variant>_r<round> folders" in capsys.readouterr().out
