// CPU implementation of the "jax_marlin_matmul" FFI target (CONTRACT.md):
// y (M, N) = x (M, K) @ dequant(packed (K/16, 2N) int32, scales (G, N)),
// fp32 accumulation, result in x's dtype (float16 or bfloat16).
#ifndef JAX_MARLIN_CPU_MARLIN_CPU_H_
#define JAX_MARLIN_CPU_MARLIN_CPU_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(MarlinMatmulCpu);

// The "jax_marlin_sparse_matmul" target: the same product for a 2:4 sparse
// weight (docs/SPARSE_FORMAT.md): values (K/32, 2N) int32, meta (K/32, N)
// int32, scales (G, N) in the grouped order for every group size.
XLA_FFI_DECLARE_HANDLER_SYMBOL(SparseMatmulCpu);

#endif  // JAX_MARLIN_CPU_MARLIN_CPU_H_
