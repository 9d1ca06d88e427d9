#!/usr/bin/env bash
# scripts/check_sass.sh BINARY...: refuses CUDA binaries that hold the one
# instruction form ptxas 13.0 is known to miscompile. It can encode an
# L2-cache-hint async copy whose shared address sits in a uniform register
# with registers it never sets (an illegal instruction at run time; see the
# prologue in stream_stripe, csrc/cuda/stripe.cuh). Needs cuobjdump (and
# nvdisasm); without it, says so and passes.
set -euo pipefail
if ! command -v cuobjdump >/dev/null; then
  echo "check_sass.sh: no cuobjdump on PATH, SASS not checked" >&2
  exit 0
fi
for b in "$@"; do
  if cuobjdump -sass "$b" | grep -E "LDGSTS.*\+UR[0-9]+.*desc\[" >/dev/null; then
    echo "error: $b has an LDGSTS with a uniform shared offset and a cache-hint descriptor" >&2
    exit 1
  fi
done
