// The CPU handler's inner loop: one decoded 16 x 64 weight tile times a block
// of x rows, accumulated in fp32.
#ifndef JAX_MARLIN_CPU_BAND_ACCUMULATE_H_
#define JAX_MARLIN_CPU_BAND_ACCUMULATE_H_

#include <cstdint>

namespace jax_marlin {

// acc[m*64 + c] += sum over r = 0..15 (in that order) of x[m*16 + r] * tile[r*64 + c]
// for m < rows, c < 64. Products and sums are separate fp32 operations (never
// fused), so every code path gives bit-identical results.
using AccumulateBandFn = void (*)(const float* x, const float* tile, float* acc, int64_t rows);

// The fastest implementation this CPU runs (AVX2 where present).
AccumulateBandFn SelectAccumulateBand();

}  // namespace jax_marlin

#endif  // JAX_MARLIN_CPU_BAND_ACCUMULATE_H_
