// XLA FFI handler running the Marlin kernel on a CUDA stream.
#pragma once

#include "xla/ffi/api/ffi.h"

// Operands: x (M, K) f16/bf16, packed (K/16, 2N) s32, scales (K/g, N) x's dtype.
// Results: y (M, N) x's dtype, workspace f32 (>= workspace_floats(M, N)),
// locks s32 (>= lock_count(M, N)). Command-buffer (CUDA graph) compatible.
XLA_FFI_DECLARE_HANDLER_SYMBOL(MarlinMatmulCuda);
