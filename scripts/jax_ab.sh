#!/usr/bin/env bash
# On the GPU machine: A/B of what JAX sees (the benchmark through XLA), where
# the kernel benchmark (scripts/ab_check.sh) cannot tell: another build
# against the installed one, and XLA flag variants on the installed build.
#
#   scripts/jax_ab.sh [-p SITE] [-n NAME] [-f XLA_FLAGS]... [-r ROUNDS] [-- BENCH_ARGS...]
#
# The installed build ("new") must be there (scripts/gpu_check.sh build).
# -p: another build, installed in the folder SITE with `python3 -m pip install
#     --no-build-isolation --no-deps --target SITE TREE` (TREE: e.g. `git
#     archive <commit> | tar -x -C .devrun/old` here, carried to the device;
#     build it beside something else, it takes a minute or two), run through
#     PYTHONPATH.
# -n: that build's variant name (default "old"; e.g. "cand" for a candidate
#     patch applied to a copy of this tree).
# -f: XLA_FLAGS for one more variant of the installed build (repeatable); a
#     value this jaxlib refuses is logged and skipped. Each flag variant also
#     runs benchmarks/xla_flags_check.py (results against the reference under
#     those flags).
# -r: rounds (default 1): every variant once a round, in the same order.
# BENCH_ARGS: for `python3 -m jax_marlin.bench` (default: the 7B set, fp16,
#     M = 1 and 16, --timer span).
# Environment: JAX_MARLIN_COMMIT (recorded as the new build's commit),
# JAX_AB_OLD_COMMIT (the other build's), OUT (default ./jax_ab_out). Each
# variant's JSON lands in $OUT/jax_ab/<variant>_r<round>/; compare with
# `python3 scripts/jax_ab_compare.py jax_ab`.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flags=()
rounds=1
old_site=""
old_name=old
while getopts "p:n:f:r:" opt; do
  case "$opt" in
    p) old_site="$(cd "$OPTARG" && pwd)" ;;
    n) old_name="$OPTARG" ;;
    f) flags+=("$OPTARG") ;;
    r) rounds="$OPTARG" ;;
    *) echo "usage: scripts/jax_ab.sh [-p SITE] [-n NAME] [-f XLA_FLAGS]... [-r ROUNDS] [-- BENCH_ARGS...]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
bench_args=("$@")
[[ ${#bench_args[@]} -eq 0 ]] && bench_args=(--sets llama2-7b --dtypes fp16 --batches 1,16 --timer span)
OUT="${OUT:-$PWD/jax_ab_out}"
logs="$OUT/jax_ab"
mkdir -p "$logs"
logs="$(cd "$logs" && pwd)"
export PYTHONUNBUFFERED=1
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
rc=0

# variant NAME PYTHONPATH COMMIT [VAR=VALUE...]: one benchmark run.
variant() {
  local name="$1" path="$2" commit="$3"
  shift 3
  # The benchmark's first line names the jax_marlin it imported (PYTHONPATH
  # wins over site-packages; the log shows that it did).
  (cd "$scratch" && env PYTHONPATH="$path" "$@" timeout 300 python3 -m jax_marlin.bench \
    "${bench_args[@]}" --out "$logs/$name" --commit "$commit") > "$logs/$name.log" 2>&1
  local status=$?
  echo "exit $status" >> "$logs/$name.log"
  [[ $status -eq 0 ]] || rc=1
}

# The installed build's results under the default flags, then flag variant
# i (1-based, in -f order), which runs as "flags<i>" if its check passed.
(cd "$scratch" && timeout 120 python3 "$repo/benchmarks/xla_flags_check.py") > "$logs/new_check.log" 2>&1 || rc=1
usable=()
: > "$logs/flags.txt"
for ((i = 1; i <= ${#flags[@]}; i++)); do
  f="${flags[$((i - 1))]}"
  echo "flags$i: $f" >> "$logs/flags.txt"
  if (cd "$scratch" && XLA_FLAGS="$f" timeout 120 python3 "$repo/benchmarks/xla_flags_check.py") \
      > "$logs/flags${i}_check.log" 2>&1; then
    usable+=("$i")
  else
    echo "flags$i ($f): refused, or wrong results (flags${i}_check.log)" | tee -a "$logs/flags.txt"
    rc=1
  fi
done

new_commit="${JAX_MARLIN_COMMIT:-unknown}"
for ((r = 1; r <= rounds; r++)); do
  variant "new_r$r" "" "$new_commit"
  [[ -n "$old_site" ]] && variant "${old_name}_r$r" "$old_site" "${JAX_AB_OLD_COMMIT:-unknown}"
  for i in "${usable[@]}"; do
    variant "flags${i}_r$r" "" "$new_commit" XLA_FLAGS="${flags[$((i - 1))]}"
  done
done
exit $rc
