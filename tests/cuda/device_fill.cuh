// Device-side fills for the tile sweeps: large buffers filled on the GPU
// (a host fill of gigabytes would dominate a sweep's run time).
#pragma once

#include <cstddef>
#include <cstdint>

// A deterministic pseudo-random word of an index (an integer hash), so that
// a candidate that reads the wrong element gives a different answer.
__device__ inline uint32_t hash_u32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352d;
  v ^= v >> 15;
  v *= 0x846ca68b;
  return v ^ (v >> 16);
}

// out[i] = a hash of (i, seed), for i < n; any grid (grid-stride loop). One
// tool = one translation unit that includes this, so no inline is needed.
__global__ void fill_words(uint32_t* out, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x)
    out[i] = hash_u32(static_cast<uint32_t>(i) * 2654435761u + seed);
}
