// Helpers shared by the standalone CUDA test tools in tests/cuda.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/float16.h"
#include "cuda/marlin_launch.h"  // workspace_floats, lock_count

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

// Copies of a K x N layer's packed weights and scales on the device, as many
// as it takes to rotate through 4x the 50 MB L2 (at least 2), so that a
// timed call reads its weights from HBM: any bits are valid codes, and
// scales 0x1c1c (~0.004 in fp16). Freed with the object.
struct RotatedWeights {
  std::vector<void*> w, s;
  size_t w_bytes, s_bytes;  // of one copy
  int copies = 0;
  RotatedWeights(int k, int n, int group)
      : w_bytes(static_cast<size_t>(k) * n / 2), s_bytes(static_cast<size_t>(k / group) * n * 2) {
    constexpr size_t kRotateBytes = size_t{200} << 20;
    copies = static_cast<int>(std::max<size_t>(2, (kRotateBytes + w_bytes - 1) / w_bytes));
    w.resize(copies), s.resize(copies);
    for (int c = 0; c < copies; ++c) {
      CHECK_CUDA(cudaMalloc(&w[c], w_bytes));
      CHECK_CUDA(cudaMalloc(&s[c], s_bytes));
      CHECK_CUDA(cudaMemset(w[c], 0x5a + c, w_bytes));
      CHECK_CUDA(cudaMemset(s[c], 0x1c, s_bytes));
    }
  }
  RotatedWeights(const RotatedWeights&) = delete;
  RotatedWeights& operator=(const RotatedWeights&) = delete;
  ~RotatedWeights() {
    for (int c = 0; c < copies; ++c) cudaFree(w[c]), cudaFree(s[c]);
  }
};

// The buffers of one timed marlin_matmul-style call on the device: an
// M x K activation (0x3c bytes: fp16 ~1.06), the M x N output, and the
// kernel's workspace and locks (zeroed once: the kernel leaves them zeroed).
struct CallBuffers {
  void *x, *y;
  float* ws;
  int* locks;
  CallBuffers(int m, int k, int n) {
    CHECK_CUDA(cudaMalloc(&x, static_cast<size_t>(m) * k * 2));
    CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(m) * n * 2));
    CHECK_CUDA(cudaMalloc(&ws, jax_marlin::cuda::workspace_floats(m, k, n) * 4));
    CHECK_CUDA(cudaMalloc(&locks, jax_marlin::cuda::lock_count(m, n) * 4));
    CHECK_CUDA(cudaMemset(x, 0x3c, static_cast<size_t>(m) * k * 2));
    CHECK_CUDA(cudaMemset(locks, 0, jax_marlin::cuda::lock_count(m, n) * 4));
  }
  CallBuffers(const CallBuffers&) = delete;
  CallBuffers& operator=(const CallBuffers&) = delete;
  ~CallBuffers() { cudaFree(x), cudaFree(y), cudaFree(ws), cudaFree(locks); }
};

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

// Back-to-back calls, for launchers that may start a call before its
// predecessor ends (programmatic dependent launch). launch(in, out, stream)
// enqueues one call that reads the fp16 activation `in` and writes `out`, of
// the same size (a K x K weight). The chain runs kChainCalls calls
// ping-ponging between two buffers, each reading the previous call's output
// and writing the buffer that call read (through the caller's one workspace
// and lock set), three ways: a synchronize after every call, back-to-back on
// a stream, and as a CUDA graph. Returns nullptr when the three end
// bit-identical with a finite result that is not all ~0, else what failed.
inline constexpr int kChainCalls = 8;  // even: the chain ends where it started

template <typename Launch>
const char* chain_failure(const std::vector<uint16_t>& x, Launch&& launch) {
  const size_t bytes = x.size() * 2;
  void* buf[2];
  for (void*& b : buf) CHECK_CUDA(cudaMalloc(&b, bytes));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto enqueue = [&](bool sync_each) {
    for (int i = 0; i < kChainCalls; ++i) {
      launch(buf[i % 2], buf[1 - i % 2], stream);
      if (sync_each) CHECK_CUDA(cudaStreamSynchronize(stream));
    }
  };
  // The resets go on `stream` too: a non-blocking stream does not wait for
  // the default stream's copies and memsets (a pageable cudaMemcpy returns
  // before its DMA lands).
  auto result = [&](auto&& run) {
    CHECK_CUDA(cudaMemcpyAsync(buf[0], x.data(), bytes, cudaMemcpyHostToDevice, stream));
    CHECK_CUDA(cudaMemsetAsync(buf[1], 0xff, bytes, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    run();
    CHECK_CUDA(cudaStreamSynchronize(stream));
    std::vector<uint16_t> y(x.size());
    CHECK_CUDA(cudaMemcpy(y.data(), buf[0], bytes, cudaMemcpyDeviceToHost));
    return y;
  };
  const auto serial = result([&] { enqueue(true); });
  const auto streamed = result([&] { enqueue(false); });
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  enqueue(false);
  CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
  CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
  const auto graphed = result([&] { CHECK_CUDA(cudaGraphLaunch(exec, stream)); });
  CHECK_CUDA(cudaGraphExecDestroy(exec));
  CHECK_CUDA(cudaGraphDestroy(graph));
  CHECK_CUDA(cudaStreamDestroy(stream));
  cudaFree(buf[0]), cudaFree(buf[1]);

  float largest = 0.f;
  for (uint16_t v : serial) {
    const float f = jax_marlin::HalfToFloat(v);
    if (!std::isfinite(f)) return "output not finite";
    largest = std::fmax(largest, std::fabs(f));
  }
  // An all-but-zero result would compare equal whatever the order.
  if (!(largest > 1e-2f)) return "output all ~0";
  if (std::memcmp(serial.data(), streamed.data(), bytes) != 0) return "streamed bits differ from synchronized";
  if (std::memcmp(serial.data(), graphed.data(), bytes) != 0) return "graphed bits differ from synchronized";
  return nullptr;
}
