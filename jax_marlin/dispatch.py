"""Large-M dispatch on the GPU: the Marlin kernel, or dequantize + XLA's dot.

The kernel streams the whole 4-bit weight once for every chunk of x's rows
(128 rows, or 64 where fewer than 97 are left), so past some M a dense GEMM
on the dequantized weight (cuBLAS through XLA) is faster. Where that happens
is measured, per GPU kind, by

    python -m jax_marlin.bench --tune-dispatch

which writes a table (JSON) to copy into ``jax_marlin/dispatch_tables/``. A
GPU kind without a table always runs the kernel; a kind not yet measured (or
not for one weight format) may borrow a sibling's entries (``"borrowed_from"``,
with the reason in the file).
The choice is made when a call is traced (M, K, N and the dtype are static
then), so it costs nothing at run time.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re

TABLE_DIR = pathlib.Path(__file__).with_name("dispatch_tables")


def table_name(device_kind: str) -> str:
    """File name of a GPU kind's table, e.g. "nvidia-h100-80gb-hbm3.json"."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") + ".json"


def _read(device_kind: str) -> dict:
    path = TABLE_DIR / table_name(device_kind)
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=None)
def load_table(device_kind: str) -> tuple:
    """The entries measured on a GPU kind (empty if none): dicts with K, N,
    dtype and min_m, the smallest M from which the dense path was faster at
    every larger M measured (None: the kernel always won)."""
    return tuple(_read(device_kind).get("entries", ()))


def entry_format(e: dict) -> str:
    """The weight format an entry is about: "dense" (Marlin, the default) or "sparse" (2:4)."""
    return e.get("format", "dense")


def decision_entries(device_kind: str, fmt: str = "dense") -> list:
    """The entries of weight format ``fmt`` the dispatch decides by: the
    kind's own, or, for a format it has none of (not yet measured, or
    withdrawn as stale) where its file says ``"borrowed_from": <kind>``, that
    kind's (one level; the file says why)."""
    own = [e for e in load_table(device_kind) if entry_format(e) == fmt]
    if own:
        return own
    lender = _read(device_kind).get("borrowed_from")
    return [e for e in load_table(lender) if entry_format(e) == fmt] if lender else []


def use_dense(device_kind: str, M: int, K: int, N: int, dtype_name: str,
              fmt: str = "dense") -> bool:
    """Whether an (M, K) x (K, N) product should take the dense path. Shapes
    that were not measured take the entry of the nearest measured shape (by
    weight size, then K) of the same dtype. ``fmt`` is the weight format:
    "dense" (Marlin) or "sparse" (2:4)."""
    entries = [e for e in decision_entries(device_kind, fmt) if e["dtype"] == dtype_name]
    if not entries:
        return False

    def distance(e):
        return (abs(math.log(e["K"] * e["N"]) - math.log(K * N)), abs(math.log(e["K"] / K)))

    min_m = min(entries, key=distance)["min_m"]
    return min_m is not None and M >= min_m


def entry_key(e: dict) -> tuple:
    """What an entry is about: the layer shape, the dtype and the weight format."""
    return (e["K"], e["N"], e["dtype"], entry_format(e))


def merge_entries(old, new) -> list:
    """A table's entries after a new measurement: the new entries, and the old
    ones the new run did not measure (same key: the new one wins)."""
    measured = {entry_key(e) for e in new}
    return [e for e in old if entry_key(e) not in measured] + list(new)


def crossover(times_by_m: dict) -> int | None:
    """min_m from measured {M: (kernel_s, dense_s)}: the smallest M from which
    the dense path is faster at that M and every larger one measured."""
    min_m = None
    for M in sorted(times_by_m, reverse=True):
        kernel_s, dense_s = times_by_m[M]
        if dense_s >= kernel_s:
            break
        min_m = M
    return min_m
