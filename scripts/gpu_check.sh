#!/usr/bin/env bash
# GPU machine check: build + install, tests, compute-sanitizer, benchmark.
#
#   scripts/gpu_check.sh [STEP...]      STEP in: build selftest tests sanitize bench
#                                       (the default), tests_sharded (every test, in
#                                       parallel processes), sparse (the 2:4 sparse kernel's
#                                       self-test, sanitizers and benchmark), prefill (the
#                                       same for the prefill kernel), tune (this GPU's
#                                       dense-format dispatch table), chains (both
#                                       self-tests' back-to-back chains, 5x), or the tuning
#                                       aids kbench, sweep, fixed (the fixed cost of a call at
#                                       M = 1), phases (one M = 1 call's timeline, block by
#                                       block), profile (ncu, M = 1), profile64 (ncu, M = 64,
#                                       dense and 2:4), profile_wgmma (ncu of the wgmma
#                                       tiles, M = 64, stalls by SASS line), probe (Hopper
#                                       wgmma layout facts)
#
# The device copy of the tree has no .git: pass the commit being checked as
# JAX_MARLIN_COMMIT=<hash> so that benchmark results name it.
# Offline-safe: builds with the machine's own scikit-build-core/nanobind/jax
# (--no-build-isolation --no-deps). Logs go to $OUT (default ./gpu_check_out):
# build.log, tests.log, sanitize_memcheck.log, sanitize_racecheck.log,
# bench.log (+ the benchmark's own files). Every step runs even if an earlier
# one failed; the exit status is non-zero if any failed; a summary comes last.
# Steps can be split over several calls (each must follow a build on the same
# machine): e.g. `gpu_check.sh build tests`, then `gpu_check.sh sanitize bench`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
# ptxas register/spill statistics for every kernel end up in build.log.
export JAX_MARLIN_PTXAS_VERBOSE="${JAX_MARLIN_PTXAS_VERBOSE:-1}"
steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(build selftest tests sanitize bench)

# Run Python from an empty directory so that `import jax_marlin` is the
# installed package, not the source tree (whose jax_marlin/ has no _ext).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

summary=()
failed=0
# step NAME LOG CMD...: run CMD (in $scratch) with output to LOG and the
# terminal; record ok/FAILED and the time taken, never abort the script.
step() {
  local name="$1" log="$2" start=$SECONDS rc=0
  shift 2
  echo "=== $name: $*"
  (cd "$scratch" && "$@") 2>&1 | tee "$log" || rc=$?
  if [[ $rc -eq 0 ]]; then
    summary+=("ok      $name ($((SECONDS - start)) s)")
  else
    summary+=("FAILED  $name (exit $rc, $((SECONDS - start)) s; see $(basename "$log"))")
    failed=1
  fi
}

sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
# Instrument only our kernels (names contain "marlin"): XLA's and cuBLAS's
# own kernels would make the run many times slower and are not ours to fix.
sanitize() {
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$sanitizer" --tool "$1" --error-exitcode 1 \
    --kernel-name kns=marlin python3 "$repo/scripts/sanitize_smoke.py"
}

# The kernel's standalone self-test (no JAX): many shapes and M values, fp16
# and bf16, every group size, run three times each to catch nondeterminism;
# then its quick subset under the sanitizers.
# Binaries prebuilt off the device (same nvcc, sm_90) may be carried in
# $repo/.devbuild/ to save device time; they must be built from this tree.
prebuilt() { [[ -x "$repo/.devbuild/$1" ]] && cp "$repo/.devbuild/$1" "$2"; }
# build BINARY TOOL: the prebuilt binary if there is one, else build TOOL
# here (scripts/build_tools.sh, the one place with the nvcc lines).
build() {
  prebuilt "$1" "$scratch/$1" && return 0
  "$repo/scripts/build_tools.sh" "$repo" "$scratch" "" "$2"
}
selftest_bin="$scratch/marlin_selftest"
build_selftest() { build marlin_selftest marlin_selftest; }
# The 2:4 sparse kernel's self-test (issue 8): built like the dense one.
sparse_bin="$scratch/sparse_selftest"
build_sparse() { build sparse_selftest sparse_selftest; }
sanitize_sparse() {
  "$sanitizer" --tool "$1" --error-exitcode 1 "$sparse_bin" --quick
}
# The prefill kernel's self-test (sm_90a): built like the others.
prefill_bin="$scratch/prefill_selftest"
build_prefill() { build prefill_selftest prefill_selftest; }
sanitize_prefill() {
  "$sanitizer" --tool "$1" --error-exitcode 1 "$prefill_bin" --quick
}
# Tuning aids (not in the default steps): candidate tile shapes timed
# directly, and an Nsight Compute report of the current M = 1 tile.
sweep_bin="$scratch/marlin_tile_sweep"
build_sweep() { build marlin_tile_sweep tile_sweep; }
# The same tool with per-phase timestamps compiled in (--phases: where the
# time of one M = 1 call goes, block by block).
phase_bin="$scratch/marlin_phase_probe"
build_phase_probe() { build marlin_phase_probe phase_probe; }
# Hopper wgmma layout probe (sm_90a): which descriptor convention holds.
probe_bin="$scratch/wgmma_probe"
build_probe() { build wgmma_probe wgmma_probe; }
NCU_SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats
              --section LaunchStats --section Occupancy --section ComputeWorkloadAnalysis
              --section InstructionStats --section SchedulerStats)
profile_m1() {
  ncu -k regex:marlin_kernel --launch-skip 20 --launch-count 1 "${NCU_SECTIONS[@]}" "$sweep_bin" 8192 8192
}
# M = 64 (the large-M question): the production tile of that M, picked by its
# mangled name (8 row blocks, 16 n-blocks, 8 k-blocks, 8 warps, grouped, two
# warps a slab, split by columns, x by TMA as on Hopper), on 28672 x 8192;
# then the sparse kernel's M = 64 tile in
# its benchmark (8 row blocks, 16 n-blocks, 4 bands, 8 warps, grouped, 2).
profile_m64() {
  ncu --kernel-name-base mangled -k regex:'TileShapeILi8ELi16ELi8ELi8ELb1ELi1ELi1ELb0ELb0ELi2ELb1E' \
    --launch-skip 5 --launch-count 1 "${NCU_SECTIONS[@]}" "$sweep_bin" 28672 8192
  if [[ -x "$sparse_bin" ]]; then
    ncu --kernel-name-base mangled -k regex:'SparseTileShapeILi8ELi16ELi4ELi8ELb1ELi2E' \
      --launch-skip 5 --launch-count 1 "${NCU_SECTIONS[@]}" "$sparse_bin" --bench
  fi
}
# The wgmma tiles at M = 64 on 8192 x 8192 (in no dispatch table; NOTES.md,
# sessions 14-16): 128 columns (r8 n8 k8) and 256 (r8 n16 k8, two slabs a
# warpgroup), x by cp.async, and the 256-column one with x by TMA (the
# mangled names end in kWgmma, kWarpsJ = 1, kTmaX). Stall reasons per issued
# instruction, then per SASS line (source page as CSV, one file per tile).
NCU_STALLS='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
profile_wgmma() {
  local name tile
  for name in n8:TileShapeILi8ELi8ELi8ELi8ELb1ELi1ELi1ELb0ELb1ELi1ELb0E \
              n16:TileShapeILi8ELi16ELi8ELi8ELb1ELi1ELi1ELb0ELb1ELi1ELb0E \
              n16tma:TileShapeILi8ELi16ELi8ELi8ELb1ELi1ELi1ELb0ELb1ELi1ELb1E; do
    tile="${name#*:}"
    ncu --kernel-name-base mangled -k regex:"$tile" --launch-skip 5 --launch-count 1 \
      --metrics "$NCU_STALLS" "${NCU_SECTIONS[@]}" "$sweep_bin" 8192 8192
    ncu --kernel-name-base mangled -k regex:"$tile" --launch-skip 5 --launch-count 1 \
      --section SourceCounters --section WarpStateStats --page source --print-source sass --csv \
      "$sweep_bin" 8192 8192 > "$OUT/ncu_source_wgmma_${name%%:*}.csv"
  done
}
sanitize_selftest() {
  "$sanitizer" --tool "$1" --error-exitcode 1 "$selftest_bin" --quick
}

# The GPU tests, then the rest of the suite on the GPU backend (each test
# runs once: the whole suite does not fit one device call twice over).
run_tests() {
  local rc=0 gpu_rc=0
  python3 -m pytest -q -p no:cacheprovider --durations=15 -m gpu "$repo/tests" || gpu_rc=$?
  [[ $gpu_rc -eq 5 ]] && echo "(no test marked gpu was collected)"
  python3 -m pytest -q -p no:cacheprovider -m "not gpu" "$repo/tests" || rc=$?
  return $((gpu_rc || rc))
}

# The same tests in shards run side by side (one process each, contiguous
# blocks of the collected ids so that module fixtures are built once a
# shard): the machine has many cores and most of a test's time is XLA
# compiling on the host. JAX_MARLIN_SHARDS sets the count (default 6);
# JAX_MARLIN_TEST_MARK, a marker expression (e.g. gpu), narrows the tests.
run_tests_sharded() {
  local n="${JAX_MARLIN_SHARDS:-6}" ids="$scratch/test_ids" rc=0 i
  local mark=(${JAX_MARLIN_TEST_MARK:+-m "$JAX_MARLIN_TEST_MARK"})
  python3 -m pytest --co -q -p no:cacheprovider "${mark[@]}" "$repo/tests" | grep '::' > "$ids"
  local total
  total=$(wc -l < "$ids")
  echo "$total tests in $n shards"
  for ((i = 0; i < n; i++)); do
    awk -v n="$n" -v i="$i" -v r="$repo/" '(NR - 1) % n == i { print r $0 }' "$ids" > "$ids.$i"
    mapfile -t shard < "$ids.$i"
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -q -p no:cacheprovider --durations=5 \
      "${shard[@]}" > "$OUT/tests_shard$i.log" 2>&1 &
  done
  for ((i = 0; i < n; i++)); do wait -n || rc=1; done
  for ((i = 0; i < n; i++)); do echo "--- shard $i"; tail -n 12 "$OUT/tests_shard$i.log"; done
  return $rc
}

for s in "${steps[@]}"; do
  case "$s" in
    build)
      # A wheel prebuilt off the device from this tree (scripts/prebuild_tools.sh
      # --wheel) saves the build here.
      wheels=("$repo"/.devbuild/wheel/*.whl)
      if [[ -f "${wheels[0]}" ]]; then
        step "install the prebuilt wheel" "$OUT/build.log" \
          python3 -m pip install --no-build-isolation --no-deps --force-reinstall "${wheels[@]}"
      else
        step "build + install" "$OUT/build.log" \
          python3 -m pip install --no-build-isolation --no-deps -v "$repo"
      fi ;;
    tests)
      step "tests (-m gpu, then -m \"not gpu\")" "$OUT/tests.log" run_tests ;;
    tests_sharded)
      step "tests, all of them, in parallel shards" "$OUT/tests.log" run_tests_sharded ;;
    selftest)
      step "build CUDA self-test" "$OUT/selftest_build.log" build_selftest
      step "CUDA self-test" "$OUT/selftest.log" "$selftest_bin"
      step "self-test under memcheck" "$OUT/selftest_memcheck.log" sanitize_selftest memcheck
      step "self-test under racecheck" "$OUT/selftest_racecheck.log" sanitize_selftest racecheck
      step "build prefill self-test" "$OUT/prefill_build.log" build_prefill
      step "prefill self-test" "$OUT/prefill_selftest.log" "$prefill_bin"
      step "prefill self-test under memcheck" "$OUT/prefill_memcheck.log" sanitize_prefill memcheck
      step "prefill self-test under racecheck" "$OUT/prefill_racecheck.log" sanitize_prefill racecheck ;;
    prefill)
      # The prefill kernel alone: self-test, sanitizers, and its benchmark
      # against the Marlin kernel's chunks (scripts/prefill_compare.py reads it).
      [[ -x "$prefill_bin" ]] || step "build prefill self-test" "$OUT/prefill_build.log" build_prefill
      step "prefill self-test" "$OUT/prefill_selftest.log" "$prefill_bin"
      step "prefill self-test under memcheck" "$OUT/prefill_memcheck.log" sanitize_prefill memcheck
      step "prefill self-test under racecheck" "$OUT/prefill_racecheck.log" sanitize_prefill racecheck
      step "prefill benchmark (--bench, chunks as mar)" "$OUT/prefill_bench.log" \
        env JAX_MARLIN_PREFILL=0 "$prefill_bin" --bench ;;
    tune)
      # The dense-format dispatch table of this GPU kind, both Llama sets and
      # dtypes (copy it into jax_marlin/dispatch_tables/ to use it).
      step "dispatch tune (--tune-dispatch --formats dense)" "$OUT/tune.log" \
        python3 -m jax_marlin.bench --tune-dispatch --formats dense --sets llama2-70b,llama2-7b \
        --dtypes fp16,bf16 --out "$OUT" ${JAX_MARLIN_COMMIT:+--commit "$JAX_MARLIN_COMMIT"} ;;
    sparse)
      step "build sparse self-test" "$OUT/sparse_build.log" build_sparse
      step "sparse self-test" "$OUT/sparse_selftest.log" "$sparse_bin"
      step "sparse self-test under memcheck" "$OUT/sparse_memcheck.log" sanitize_sparse memcheck
      step "sparse self-test under racecheck" "$OUT/sparse_racecheck.log" sanitize_sparse racecheck
      step "sparse kernel benchmark (--bench)" "$OUT/sparse_bench.log" "$sparse_bin" --bench ;;
    chains)
      # Back-to-back calls (overlapped launches), five times each: dense and 2:4.
      [[ -x "$selftest_bin" ]] || step "build CUDA self-test" "$OUT/selftest_build.log" build_selftest
      [[ -x "$sparse_bin" ]] || step "build sparse self-test" "$OUT/sparse_build.log" build_sparse
      step "back-to-back chains x5 (--chains)" "$OUT/chains.log" \
        bash -c "for i in 1 2 3 4 5; do '$selftest_bin' --chains && '$sparse_bin' --chains || exit 1; done" ;;
    kbench)
      # The production launcher's kernel time per shape and M (CUDA graphs,
      # no JAX), against the copy bandwidth measured in the same run.
      [[ -x "$selftest_bin" ]] || step "build CUDA self-test" "$OUT/selftest_build.log" build_selftest
      step "kernel benchmark (self-test --bench)" "$OUT/kbench.log" "$selftest_bin" --bench ;;
    sweep)
      step "build tile sweep" "$OUT/sweep_build.log" build_sweep
      step "tile sweep" "$OUT/sweep.log" "$sweep_bin" ;;
    probe)
      step "build wgmma probe" "$OUT/probe_build.log" build_probe
      step "wgmma probe" "$OUT/probe.log" "$probe_bin" ;;
    fixed)
      [[ -x "$sweep_bin" ]] || step "build tile sweep" "$OUT/sweep_build.log" build_sweep
      step "fixed cost of a call at M = 1 (sweep --fixed)" "$OUT/fixed.log" "$sweep_bin" --fixed ;;
    phases)
      step "build phase probe" "$OUT/phases_build.log" build_phase_probe
      step "timeline of a call at M = 1 (--phases)" "$OUT/phases.log" "$phase_bin" --phases ;;
    profile)
      [[ -x "$sweep_bin" ]] || step "build tile sweep" "$OUT/sweep_build.log" build_sweep
      step "ncu: 8192x8192, M = 1" "$OUT/ncu_m1.log" profile_m1 ;;
    profile64)
      [[ -x "$sweep_bin" ]] || step "build tile sweep" "$OUT/sweep_build.log" build_sweep
      [[ -x "$sparse_bin" ]] || step "build sparse self-test" "$OUT/sparse_build.log" build_sparse
      step "ncu: 28672x8192 and 2:4 sparse, M = 64" "$OUT/ncu_m64.log" profile_m64 ;;
    profile_wgmma)
      [[ -x "$sweep_bin" ]] || step "build tile sweep" "$OUT/sweep_build.log" build_sweep
      step "ncu: wgmma tiles, 8192x8192, M = 64" "$OUT/ncu_wgmma.log" profile_wgmma ;;
    sanitize)
      step "compute-sanitizer memcheck" "$OUT/sanitize_memcheck.log" sanitize memcheck
      step "compute-sanitizer racecheck" "$OUT/sanitize_racecheck.log" sanitize racecheck ;;
    bench)
      if [[ -f "$repo/jax_marlin/bench.py" ]]; then
        step "benchmark (--quick)" "$OUT/bench.log" python3 -m jax_marlin.bench --quick --check-timing --out "$OUT" --commit "${JAX_MARLIN_COMMIT:-unknown}"
      else
        summary+=("skipped benchmark (no jax_marlin/bench.py)")
      fi ;;
    *)
      summary+=("FAILED  unknown step '$s' (use build, selftest, tests, tests_sharded, sanitize, bench, sparse, kbench, sweep, fixed, phases, profile, profile64, profile_wgmma, probe)")
      failed=1 ;;
  esac
done

echo
echo "=== gpu_check summary (logs in $OUT)"
printf '  %s\n' "${summary[@]}"
exit "$failed"
