"""The prefill kernel's bench against the paths it would replace.

    python3 scripts/prefill_compare.py PF_BENCH_LOG [DISPATCH_TABLE]

PF_BENCH_LOG: `JAX_MARLIN_PREFILL=0 prefill_selftest --bench` output (rows
"K N M group var us/call TFLOP/s"; var "mar" is marlin_matmul's chunks, the
others the prefill variants, e.g. p41 or q21s3: 128- or 64-row tiles,
warpgroups x slabs, K split; lines "pick K N M group var": the launch
pick_prefill_shape chooses). DISPATCH_TABLE (default: the H100's) gives the
dense path's time (dequantize + cuBLAS, fp16) at the same K, N and M. For
each row: the chunks, the best variant, the dense path, and the best
variant's speedup over the faster of the two it would replace; then, per
layer and group, the smallest M from which prefill wins at every larger M
measured (what kPrefillMinRows is set from); then, where the log has
picks, each pick's time against the fastest row of its case (what the
stage times in prefill_shape_for are set from).
"""

import collections
import json
import os
import sys

DEFAULT_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jax_marlin",
                             "dispatch_tables", "nvidia-h100-80gb-hbm3.json")


def parse(path):
    """{(K, N, M, group): {var: us}} from a bench log."""
    rows = collections.defaultdict(dict)
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 7 or not parts[0].isdigit():
                continue
            k, n, m, group, var, us = int(parts[0]), int(parts[1]), int(parts[2]), parts[3], parts[4], parts[5]
            rows[(k, n, m, group)][var] = float(us)
    return rows


def picks(path):
    """{(K, N, M, group): var} from a bench log's "pick" lines."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 6 and parts[0] == "pick":
                out[(int(parts[1]), int(parts[2]), int(parts[3]), parts[4])] = parts[5]
    return out


def pick_report(rows, chosen):
    """Lines: each pick's time, the fastest row of its case, and pick / fastest."""
    lines = [f"{'K':>6} {'N':>6} {'M':>5} {'group':>5} {'pick':>6} {'us':>9} {'fastest':>7} {'us':>9} {'ratio':>6}"]
    for key, var in sorted(chosen.items()):
        t = rows.get(key, {})
        if var not in t or not t:
            continue
        fastest, best = min(t.items(), key=lambda kv: kv[1])
        k, n, m, group = key
        lines.append(f"{k:>6} {n:>6} {m:>5} {group:>5} {var:>6} {t[var]:>9.1f} {fastest:>7} {best:>9.1f} "
                     f"{t[var] / best:>6.2f}")
    return lines


def dense_times(path):
    """{(K, N, M): us} of the dense path, fp16, from a dispatch table."""
    with open(path) as f:
        table = json.load(f)
    return {(e["K"], e["N"], int(m)): t["dense"]
            for e in table.get("entries", ()) if e["dtype"] == "float16" and e.get("format", "dense") == "dense"
            for m, t in e["us"].items()}


def compare(rows, dense):
    """Lines of the comparison, and {(K, N, group): smallest winning M or None}."""
    lines = [f"{'K':>6} {'N':>6} {'M':>5} {'group':>5} {'chunks':>9} {'best':>9} {'var':>4} {'dense':>9} {'speedup':>7}"]
    wins = collections.defaultdict(list)
    for (k, n, m, group), t in sorted(rows.items()):
        variants = {v: us for v, us in t.items() if v != "mar"}
        if not variants:
            continue
        var, best = min(variants.items(), key=lambda kv: kv[1])
        others = [us for us in (t.get("mar"), dense.get((k, n, m))) if us is not None]
        speedup = min(others) / best if others else float("nan")
        d = dense.get((k, n, m))
        lines.append(f"{k:>6} {n:>6} {m:>5} {group:>5} {t.get('mar', float('nan')):>9.1f} {best:>9.1f} {var:>4} "
                     f"{(d if d is not None else float('nan')):>9.1f} {speedup:>7.2f}")
        wins[(k, n, group)].append((m, speedup > 1))
    first = {}
    for key, ms in wins.items():
        winning = None
        for m, won in sorted(ms, reverse=True):
            if not won:
                break
            winning = m
        first[key] = winning
    return lines, first


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    rows = parse(argv[1])
    dense = dense_times(argv[2] if len(argv) > 2 else DEFAULT_TABLE)
    lines, first = compare(rows, dense)
    print("\n".join(lines))
    print("\nprefill wins from M (at every larger M measured; - : not at the largest):")
    for (k, n, group), m in sorted(first.items()):
        print(f"  {k}x{n} {group}: {m if m is not None else '-'}")
    chosen = picks(argv[1])
    if chosen:
        print("\npick_prefill_shape's choice against the fastest row (ratio 1.00: it picked the fastest):")
        print("\n".join(pick_report(rows, chosen)))


if __name__ == "__main__":
    main(sys.argv)
