// XLA FFI handler running the Marlin kernel on a CUDA stream.
#pragma once

#include "xla/ffi/api/ffi.h"

// A stateful target: the instantiate stage (attributes `rows` = M, `cols` =
// N) allocates and zeroes the kernel's lock counters once (on every visible
// device; execution uses its stream's); the kernel leaves them zeroed, so no
// call pays for a reset.
// Execute operands: x (M, K) f16/bf16, packed (K/16, 2N) s32, scales (K/g, N)
// in x's dtype; results: y (M, N) in x's dtype, workspace f32
// (>= workspace_floats(M, K, N)). Command-buffer (CUDA graph) compatible.
XLA_FFI_DECLARE_HANDLER_SYMBOL(MarlinMatmulCudaInstantiate);
XLA_FFI_DECLARE_HANDLER_SYMBOL(MarlinMatmulCuda);

// The 2:4 sparse target (docs/SPARSE_FORMAT.md), stateful the same way (the
// same lock-buffer type). Execute operands: x (M, K), values (K/32, 2N) s32,
// meta (K/32, N) s32, scales (K/g, N) in x's dtype (grouped order for every
// g); results: y (M, N), workspace f32 (>= sparse_workspace_floats(M, K, N)).
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseMatmulCudaInstantiate);
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseMatmulCuda);

// The dense weight, CUDA only (the dense path of large M): packed (K/16, 2N)
// s32, scales (G, N) f16/bf16 -> w (K, N) in the scales' dtype, row-major,
// equal to jax_marlin.dequantize bit for bit. Stateless; command-buffer
// compatible.
XLA_FFI_DECLARE_HANDLER_SYMBOL(MarlinDequantizeCuda);

namespace jax_marlin::cuda {

// The per-call state's type, for jax.ffi.register_ffi_type (it must be
// registered, after the backend starts, before the handler).
XLA_FFI_TypeId* lock_buffer_type_id();
const XLA_FFI_TypeInfo* lock_buffer_type_info();

// How many executions so far ran while their stream was being captured into
// a CUDA graph (an XLA command buffer). A diagnostic for tests.
int64_t captured_call_count();

}  // namespace jax_marlin::cuda
