// Helpers shared by the standalone CUDA test tools in tests/cuda.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

// Test tools stop at the first CUDA error, naming the call that failed.
#define CHECK_CUDA(call)                                                                        \
  do {                                                                                          \
    cudaError_t e_ = (call);                                                                    \
    if (e_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

// Median over `reps` of the time of `calls` back-to-back launch(i) calls on
// the default stream, per call, in microseconds (CUDA events, after one
// warm-up round).
template <typename Fn>
float median_us_per_call(Fn&& launch, int calls, int reps = 9) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < calls; ++i) launch(i);
  std::vector<float> ms(reps);
  for (float& t : ms) {
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < calls; ++i) launch(i);
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e3f / calls;
}
