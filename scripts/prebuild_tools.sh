#!/usr/bin/env bash
# Builds every standalone CUDA tool of this tree (scripts/build_tools.sh) here,
# off the device, into .devbuild/ (git-ignored): pass `carry: [".devbuild"]`
# to the device run and scripts/gpu_check.sh uses them instead of compiling
# there, which saves device time. They must be rebuilt after any change to
# csrc/ or tests/cuda/.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rm -f "$repo/.devbuild"/*
"$repo/scripts/build_tools.sh" "$repo" "$repo/.devbuild" "" \
  marlin_selftest sparse_selftest tile_sweep phase_probe wgmma_probe
