// CPU implementation of the "jax_marlin_matmul" FFI target (CONTRACT.md):
// y (M, N) = x (M, K) @ dequant(packed (K/16, 2N) int32, scales (G, N)),
// fp32 accumulation, result in x's dtype (float16 or bfloat16).
#ifndef JAX_MARLIN_CPU_MARLIN_CPU_H_
#define JAX_MARLIN_CPU_MARLIN_CPU_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(MarlinMatmulCpu);

#endif  // JAX_MARLIN_CPU_MARLIN_CPU_H_
