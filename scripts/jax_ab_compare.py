"""Compares the benchmark results of a JAX-level A/B run (scripts/jax_ab.sh).

    python3 scripts/jax_ab_compare.py JAX_AB_DIR

JAX_AB_DIR holds one folder a variant and round (new_r1, old_r1, flags1_r1,
...), each with the JSON `python -m jax_marlin.bench` wrote. Prints one row
per (K, N, M, dtype, group): the Marlin time in us of every variant (median
over its rounds) and its change against "new" in percent, then the same for
`jnp.dot` (the 16-bit baseline: it moves only with the machine or the flags,
so it tells noise from a kernel change).
"""

import collections
import glob
import json
import os
import re
import statistics
import sys

FOLDER = re.compile(r"(.+)_r(\d+)$")


def read(folder):
    """{(K, N, M, dtype, group): (marlin_s, dense_s)} of the JSON files in `folder`."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        for r in result.get("rows", []):
            rows[(r["K"], r["N"], r["M"], r["dtype"], r["group"])] = (r["marlin_s"], r.get("dense_s"))
    return rows


def collect(top):
    """{variant: {row key: [(marlin_s, dense_s) per round]}}."""
    runs = collections.defaultdict(lambda: collections.defaultdict(list))
    for entry in sorted(os.listdir(top)):
        m = FOLDER.match(entry)
        if m and os.path.isdir(os.path.join(top, entry)):
            for key, times in read(os.path.join(top, entry)).items():
                runs[m.group(1)][key].append(times)
    return runs


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(runs, variants, column, title):
    print(title)
    print(f"{'K':>6} {'N':>6} {'M':>4} {'dtype':>5} {'group':>5} " +
          " ".join(f"{v:>16}" for v in variants))
    keys = sorted({k for v in variants for k in runs[v]}, key=lambda k: (k[3], str(k[4]), k[0], k[1], k[2]))
    for key in keys:
        base = median(t[column] for t in runs["new"].get(key, [])) if "new" in runs else None
        cells = []
        for v in variants:
            t = median(x[column] for x in runs[v].get(key, []))
            if t is None:
                cells.append(f"{'-':>16}")
            elif base and v != "new":
                cells.append(f"{t * 1e6:8.2f} ({100 * (t / base - 1):+5.1f}%)")
            else:
                cells.append(f"{t * 1e6:16.2f}")
        print(f"{key[0]:>6} {key[1]:>6} {key[2]:>4} {key[3]:>5} {str(key[4]):>5} " + " ".join(cells))


def main(argv):
    if len(argv) != 1:
        print(__doc__)
        return 2
    runs = collect(argv[0])
    if not runs:
        print(f"no <variant>_r<round> folders with results in {argv[0]}")
        return 1
    variants = (["new"] if "new" in runs else []) + sorted(v for v in runs if v != "new")
    flags = os.path.join(argv[0], "flags.txt")
    if os.path.exists(flags):
        with open(flags) as f:
            text = f.read().strip()
        if text:
            print(text)
    table(runs, variants, 0, "marlin_matmul, us a call (change against new)")
    table(runs, variants, 1, "jnp.dot (16-bit weight), us a call (change against new)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
