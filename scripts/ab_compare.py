"""Compares the --bench logs of an A/B run (scripts/ab_check.sh) variant by variant.

    python3 scripts/ab_compare.py AB_LOGS_DIR [--threshold PCT]

For each self-test's benchmark (dense: marlin_selftest, 2:4 sparse:
sparse_selftest) prints one row per (K, N, M, group): every variant's time
in us (mean of its rounds; the sparse benchmark's dense column too), and
each variant's change against main in percent. Rows where some variant
moved by more than --threshold percent (default 2) are marked with '*'.
"""

import argparse
import collections
import os
import re
import statistics
import sys

LOG = re.compile(r"bench_(marlin_selftest|sparse_selftest)_(.+)_r(\d+)\.log$")
# Columns of a result row: K N M group, then times (dense: us/call;
# sparse: sparse_us dense_us).
TIMES = {"marlin_selftest": ("us",), "sparse_selftest": ("sparse_us", "dense_us")}


def read_rows(path, ntimes):
    rows = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 + ntimes and parts[0].isdigit() and parts[2].isdigit():
                try:
                    rows[tuple(parts[:4])] = tuple(float(p) for p in parts[4:4 + ntimes])
                except ValueError:
                    continue
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs")
    ap.add_argument("--threshold", type=float, default=2.0)
    args = ap.parse_args(argv)
    # runs[tool][variant] = list of {row key: times}
    runs = collections.defaultdict(lambda: collections.defaultdict(list))
    for name in sorted(os.listdir(args.logs)):
        m = LOG.match(name)
        if m:
            tool, variant = m.group(1), m.group(2)
            runs[tool][variant].append(read_rows(os.path.join(args.logs, name), len(TIMES[tool])))
    if not runs:
        sys.exit(f"ab_compare.py: no bench_*_r*.log files in {args.logs}")
    for tool, by_variant in runs.items():
        if "main" not in by_variant:
            print(f"{tool}: no main (baseline) logs; skipped")
            continue
        variants = ["main"] + sorted(v for v in by_variant if v != "main")
        keys = [k for k in by_variant["main"][0] if all(k in r for v in variants for r in by_variant[v])]
        for t, column in enumerate(TIMES[tool]):
            print(f"\n{tool}: {column} (mean of rounds: {', '.join(f'{v} {len(by_variant[v])}' for v in variants)})")
            head = f"{'K':>6} {'N':>6} {'M':>4} {'group':>5} " + " ".join(f"{v:>10}" for v in variants)
            head += " " + " ".join(f"{v + ' %':>10}" for v in variants[1:])
            print(head)
            for k in keys:
                means = [statistics.mean(r[k][t] for r in by_variant[v]) for v in variants]
                changes = [100 * (x / means[0] - 1) for x in means[1:]]
                mark = " *" if any(abs(c) > args.threshold for c in changes) else ""
                print(f"{k[0]:>6} {k[1]:>6} {k[2]:>4} {k[3]:>5} " + " ".join(f"{x:10.2f}" for x in means)
                      + " " + " ".join(f"{c:+9.1f}%" for c in changes) + mark)


if __name__ == "__main__":
    main()
