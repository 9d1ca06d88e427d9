#!/usr/bin/env bash
# The one place that builds the standalone CUDA tools (self-tests, tile
# sweep, phase probe, wgmma probe) from a source tree into a folder, side by
# side, then checks their SASS (scripts/check_sass.sh).
#
#   scripts/build_tools.sh SRC OUT ["NVCC FLAGS"] [TOOL...]
#
# TOOL: marlin_selftest, sparse_selftest (the default: both), prefill_selftest, tile_sweep,
# phase_probe, wgmma_probe, sparse_sweep, wgmma_rate; each lands in OUT under the name gpu_check.sh
# runs (marlin_selftest, sparse_selftest, marlin_tile_sweep,
# marlin_phase_probe, wgmma_probe; sparse_sweep: sparse_tile_sweep; wgmma_rate: wgmma_rate_probe, the
# tensor-core rate of back-to-back wgmmas, run by hand). NVCC FLAGS: extra flags for a tuning
# build, e.g. -DJAX_MARLIN_MAX_STAGES=4. Used by scripts/prebuild_tools.sh
# (every tool of this tree into .devbuild), by gpu_check.sh when nothing was
# prebuilt, and for A/B runs: one folder a variant (e.g. .ab/main, .ab/cand,
# git-ignored, carried to the device), checked and timed there by
# scripts/ab_check.sh. About 2 minutes a self-test on two cores.
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
# The self-tests as the package builds for Hopper: sm_90a code, the wgmma tiles in.
sm90a_build=(-gencode=arch=compute_90a,code=sm_90a -DJAX_MARLIN_SM90A_BUILD)
sm90a=(-gencode=arch=compute_90a,code=sm_90a)
built=()
pids=()
for t in "${tools[@]}"; do
  case "$t" in
    marlin_selftest)
      "${nvcc[@]}" -O2 "${sm90a_build[@]}" "$src/tests/cuda/marlin_selftest.cu" \
        "$src/csrc/cuda/marlin_dispatch.cu" "$src/csrc/cuda/prefill_dispatch.cu" -o "$out/marlin_selftest" &
      built+=("$out/marlin_selftest") ;;
    sparse_selftest)
      "${nvcc[@]}" -O2 "${sm90a_build[@]}" "$src/tests/cuda/sparse_selftest.cu" \
        "$src/csrc/cuda/sparse_dispatch.cu" "$src/csrc/cuda/marlin_dispatch.cu" "$src/csrc/cuda/prefill_dispatch.cu" -o "$out/sparse_selftest" &
      built+=("$out/sparse_selftest") ;;
    tile_sweep)
      "${nvcc[@]}" -O3 "${sm90a[@]}" "$src/tests/cuda/marlin_tile_sweep.cu" \
        "$src/csrc/cuda/marlin_dispatch.cu" "$src/csrc/cuda/prefill_dispatch.cu" -o "$out/marlin_tile_sweep" &
      built+=("$out/marlin_tile_sweep") ;;
    phase_probe)
      "${nvcc[@]}" -O3 -DJAX_MARLIN_PHASES "${sm90a[@]}" "$src/tests/cuda/marlin_tile_sweep.cu" \
        "$src/csrc/cuda/marlin_dispatch.cu" "$src/csrc/cuda/prefill_dispatch.cu" -o "$out/marlin_phase_probe" &
      built+=("$out/marlin_phase_probe") ;;
    prefill_selftest)
      "${nvcc[@]}" -O2 "${sm90a_build[@]}" "$src/tests/cuda/prefill_selftest.cu" \
        "$src/csrc/cuda/marlin_dispatch.cu" "$src/csrc/cuda/prefill_dispatch.cu" -o "$out/prefill_selftest" &
      built+=("$out/prefill_selftest") ;;
    wgmma_probe)
      "${nvcc[@]}" -O2 "${sm90a[@]}" "$src/tests/cuda/wgmma_probe.cu" -o "$out/wgmma_probe" &
      built+=("$out/wgmma_probe") ;;
    sparse_sweep)
      "${nvcc[@]}" -O3 "${sm90a_build[@]}" "$src/tests/cuda/sparse_tile_sweep.cu" \
        "$src/csrc/cuda/sparse_dispatch.cu" "$src/csrc/cuda/marlin_dispatch.cu" "$src/csrc/cuda/prefill_dispatch.cu" -o "$out/sparse_tile_sweep" &
      built+=("$out/sparse_tile_sweep") ;;
    wgmma_rate)
      "${nvcc[@]}" -O2 "${sm90a[@]}" "$src/tests/cuda/wgmma_rate_probe.cu" -o "$out/wgmma_rate_probe" &
      built+=("$out/wgmma_rate_probe") ;;
    *)
      echo "build_tools.sh: unknown tool '$t' (marlin_selftest, sparse_selftest, prefill_selftest, tile_sweep," \
        "phase_probe, wgmma_probe, sparse_sweep, wgmma_rate)" >&2
      exit 2 ;;
  esac
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[[ $failed -eq 0 ]] || { echo "build_tools.sh: a build failed" >&2; exit 1; }
"$(dirname "${BASH_SOURCE[0]}")/check_sass.sh" "${built[@]}"
ls -l "${built[@]}"
