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

// Median over `reps` of the time of `calls` back-to-back launch(i, stream)
// calls, per call, in microseconds. The calls are captured once into a CUDA
// graph and the graph is timed with events: host launch overhead, which
// would dominate kernels of a few microseconds, stays out of the figure.
// One warm-up round runs uncaptured first (launchers set kernel attributes
// on first use, which a capture does not allow).
template <typename Fn>
float median_us_per_call(Fn&& launch, int calls, int reps = 9) {
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  for (int i = 0; i < calls; ++i) launch(i, stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) launch(i, stream);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  CHECK_CUDA(cudaGraphLaunch(exec, stream));

  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> ms(reps);
  for (float& t : ms) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    CHECK_CUDA(cudaGraphLaunch(exec, stream));
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaStreamDestroy(stream));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e3f / calls;
}

// Streams src to dst with 16-byte accesses, as many blocks as fill the GPU.
__global__ void stream_copy_kernel(const int4* __restrict__ src, int4* __restrict__ dst, size_t n) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x)
    dst[i] = src[i];
}

// Copy bandwidth, bytes read + written per second, of a 1 GiB
// device-to-device copy by SM loads and stores: the roofline's yardstick.
// (cudaMemcpyAsync inside a graph goes through the copy engines, which reach
// ~20% less than the SMs: it made every roofline figure look too good.)
inline double copy_bandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *src, *dst;
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  CHECK_CUDA(cudaMemset(src, 1, bytes));
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const float us = median_us_per_call(
      [&](int, cudaStream_t stream) {
        stream_copy_kernel<<<sms * 8, 256, 0, stream>>>(static_cast<const int4*>(src),
                                                        static_cast<int4*>(dst), bytes / 16);
        CHECK_CUDA(cudaGetLastError());
      },
      4);
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return 2.0 * bytes / (us * 1e-6);
}
