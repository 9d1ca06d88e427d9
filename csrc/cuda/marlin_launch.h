// Framework-free entry point of the CUDA Marlin kernel: raw device pointers,
// sizes and a stream. The XLA FFI handler is the only caller.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace jax_marlin::cuda {

enum class ActDtype { kFloat16, kBFloat16 };

struct MarlinProblem {
  ActDtype dtype;
  const void* x;       // (m, k) activations
  const void* packed;  // (k / 16, 2 n) int32, Marlin layout
  const void* scales;  // (k / group_size, n) permuted scales, same dtype as x
  void* y;             // (m, n) output, same dtype as x
  float* workspace;    // workspace_floats(m, k, n) floats, any contents
  int* locks;          // lock_count(m, n) ints: zeroed here, unless locks_zeroed
  bool locks_zeroed;   // locks are all 0 on entry (they are 0 again on exit)
  int m, k, n;
  int group_size;      // 32, 64, 128, or k (per-channel)
  // Whether the launch may overlap the previous kernel in the stream
  // (programmatic dependent launch, sm_90+, kLaunchesOverlapping tiles). Off where
  // the overlap cannot happen, e.g. a call traced into a CUDA graph of its
  // own (XLA's command buffers): the kernel then also skips the L2 prefetch
  // it would otherwise issue before waiting for its predecessor.
  bool may_overlap = true;
};

// Scratch sizes the caller must provide.
size_t workspace_floats(int m, int k, int n);
size_t lock_count(int m, int n);

// nullptr if the kernel supports the shapes, else a message saying why not.
const char* unsupported_reason(int m, int k, int n, int group_size);

// One-time set-up of every kernel instance on the current device (shared-
// memory limits, occupancy); marlin_matmul does it lazily otherwise. Call it
// where no stream is being captured: some of it is not allowed in a capture.
cudaError_t prepare_kernels();

// Enqueues the whole product on `stream` (a lock reset unless locks_zeroed,
// then one launch per chunk of up to 128 rows of x). Returns the first CUDA error met. Capturable in a CUDA
// graph: no host synchronisation, no allocation.
cudaError_t marlin_matmul(const MarlinProblem& problem, cudaStream_t stream);

// The weight itself: w = (code - 8) * scale, row-major (k, n), in the
// scales' dtype (marlin_dequantize.cu), for the large-M dense path.
struct DequantizeProblem {
  ActDtype dtype;
  const void* packed;  // (k / 16, 2 n) int32, Marlin layout
  const void* scales;  // (k / group_size, n) permuted scales
  void* w;             // (k, n) output
  int k, n;
  int group_size;      // 32, 64, 128, or k (per-channel)
};
cudaError_t marlin_dequantize(const DequantizeProblem& problem, cudaStream_t stream);

}  // namespace jax_marlin::cuda
