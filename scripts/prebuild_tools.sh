#!/usr/bin/env bash
# Builds the standalone CUDA tools (self-tests, tile sweep, wgmma probe) here,
# off the device, into .devbuild/ (git-ignored): pass `carry: [".devbuild"]`
# to the device run and scripts/gpu_check.sh uses them instead of compiling
# there, which saves device time. They must be rebuilt after any change to
# csrc/ or tests/cuda/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$repo/.devbuild"
mkdir -p "$out"
rm -f "$out"/*
nvcc=(nvcc -std=c++17 -I"$repo/csrc" -I"$repo/tests/cuda")
"${nvcc[@]}" -O2 -gencode=arch=compute_90,code=sm_90 "$repo/tests/cuda/marlin_selftest.cu" \
  "$repo/csrc/cuda/marlin_dispatch.cu" -o "$out/marlin_selftest" &
"${nvcc[@]}" -O2 -gencode=arch=compute_90,code=sm_90 "$repo/tests/cuda/sparse_selftest.cu" \
  "$repo/csrc/cuda/sparse_dispatch.cu" "$repo/csrc/cuda/marlin_dispatch.cu" -o "$out/sparse_selftest" &
"${nvcc[@]}" -O3 -gencode=arch=compute_90a,code=sm_90a "$repo/tests/cuda/marlin_tile_sweep.cu" \
  "$repo/csrc/cuda/marlin_dispatch.cu" -o "$out/marlin_tile_sweep" &
"${nvcc[@]}" -O3 -DJAX_MARLIN_PHASES -gencode=arch=compute_90a,code=sm_90a "$repo/tests/cuda/marlin_tile_sweep.cu" \
  "$repo/csrc/cuda/marlin_dispatch.cu" -o "$out/marlin_phase_probe" &
if [[ -f "$repo/tests/cuda/wgmma_probe.cu" ]]; then
  "${nvcc[@]}" -O2 -gencode=arch=compute_90a,code=sm_90a "$repo/tests/cuda/wgmma_probe.cu" \
    -o "$out/wgmma_probe" &
fi
wait
ls -l "$out"
"$repo/scripts/check_sass.sh" "$out"/*
