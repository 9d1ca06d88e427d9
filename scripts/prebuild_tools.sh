#!/usr/bin/env bash
# Builds every standalone CUDA tool of this tree (scripts/build_tools.sh) here,
# off the device, into .devbuild/ (git-ignored): pass `carry: [".devbuild"]`
# to the device run and scripts/gpu_check.sh uses them instead of compiling
# there, which saves device time. They must be rebuilt after any change to
# csrc/ or tests/cuda/.
#
#   scripts/prebuild_tools.sh [--wheel]
#
# --wheel: also a wheel of this tree for the device's Python (3.12; sm_90a
# only, ~3 minutes on two cores) into .devbuild/wheel/, which gpu_check.sh's
# build step installs instead of building. The device has no network and
# this machine's Python may differ, so the build runs with PY312 (default
# python3.12, or pyenv's 3.12) and --no-build-isolation: nanobind and
# scikit-build-core come from HOST_SITE (the site-packages of a Python
# that has them and jax), and `jax.ffi.include_dir()` from a stand-in jax
# module pointing at that jaxlib's headers (the build needs nothing else of
# jax).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel=0
[[ "${1:-}" == "--wheel" ]] && wheel=1
rm -rf "$repo/.devbuild"
mkdir -p "$repo/.devbuild"
if ((wheel)); then
  py312="${PY312:-python3.12}"
  "$py312" --version >/dev/null 2>&1 || py312="$HOME/.pyenv/versions/3.12.1/bin/python"
  host_py="${HOST_PY:-python3}"
  host_site="${HOST_SITE:-$("$host_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}"
  include="$("$host_py" -c 'from jax import ffi; print(ffi.include_dir())')"
  stand_in="$(mktemp -d)"
  trap 'rm -rf "$stand_in"' EXIT
  mkdir -p "$stand_in/jax"
  : > "$stand_in/jax/__init__.py"
  printf 'def include_dir():\n    return "%s"\n' "$include" > "$stand_in/jax/ffi.py"
  # A clean copy of the tree: the build reads the sources as it goes.
  git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 tar cf -) | (mkdir -p "$stand_in/src" && cd "$stand_in/src" && tar xf -)
  JAX_MARLIN_CUDA_ARCHS=90a PATH="/usr/local/cuda/bin:$PATH" PYTHONPATH="$stand_in:$host_site" \
    "$py312" -m pip wheel --no-build-isolation --no-deps -w "$repo/.devbuild/wheel" "$stand_in/src" &
  wheel_pid=$!
fi
"$repo/scripts/build_tools.sh" "$repo" "$repo/.devbuild" "" \
  marlin_selftest sparse_selftest prefill_selftest tile_sweep phase_probe wgmma_probe
if ((wheel)); then wait "$wheel_pid"; ls "$repo/.devbuild/wheel"; fi
