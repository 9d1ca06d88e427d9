#!/usr/bin/env bash
# Builds one variant of the standalone CUDA self-tests for an A/B run on the
# GPU machine (scripts/ab_check.sh), here, off the device.
#
#   scripts/ab_build.sh SRC OUT ["NVCC FLAGS"] [TOOL...]
#
# SRC: a source tree (main, or a worktree of a candidate branch); OUT: the
# variant's folder, e.g. .ab/main or .ab/cand (keep .ab git-ignored, e.g. in
# .git/info/exclude, and pass it in the device run's carry); NVCC FLAGS:
# extra flags such as -DJAX_MARLIN_MAX_STAGES=4; TOOL: marlin_selftest,
# sparse_selftest (the default: both) and phase_probe. About 2 minutes a tool
# on two cores. Each binary is checked for the instruction form ptxas 13.0
# can miscompile (scripts/check_sass.sh).
set -euo pipefail
src="$(cd "$1" && pwd)"
out="$2"
flags="${3:-}"
shift $(( $# >= 3 ? 3 : $# ))
tools=("$@")
[[ ${#tools[@]} -eq 0 ]] && tools=(marlin_selftest sparse_selftest)
mkdir -p "$out"
# shellcheck disable=SC2206
nvcc=(nvcc -std=c++17 -I"$src/csrc" -I"$src/tests/cuda" $flags)
for t in "${tools[@]}"; do
  case "$t" in
    marlin_selftest)
      "${nvcc[@]}" -O2 -gencode=arch=compute_90,code=sm_90 "$src/tests/cuda/marlin_selftest.cu" \
        "$src/csrc/cuda/marlin_dispatch.cu" -o "$out/marlin_selftest" ;;
    sparse_selftest)
      "${nvcc[@]}" -O2 -gencode=arch=compute_90,code=sm_90 "$src/tests/cuda/sparse_selftest.cu" \
        "$src/csrc/cuda/sparse_dispatch.cu" "$src/csrc/cuda/marlin_dispatch.cu" -o "$out/sparse_selftest" ;;
    phase_probe)
      "${nvcc[@]}" -O3 -DJAX_MARLIN_PHASES -gencode=arch=compute_90a,code=sm_90a \
        "$src/tests/cuda/marlin_tile_sweep.cu" "$src/csrc/cuda/marlin_dispatch.cu" -o "$out/marlin_phase_probe" ;;
    *) echo "ab_build.sh: unknown tool '$t' (marlin_selftest, sparse_selftest, phase_probe)" >&2; exit 2 ;;
  esac
done
"$(dirname "${BASH_SOURCE[0]}")/check_sass.sh" "$out"/*
ls -l "$out"
