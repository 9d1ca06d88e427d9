// Framework-free entry point of the 2:4 sparse CUDA kernel (issue 8): raw
// device pointers, sizes and a stream. The XLA FFI handler and
// tests/cuda/sparse_selftest.cu are the callers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "marlin_launch.h"  // ActDtype

namespace jax_marlin::cuda {

struct SparseProblem {
  ActDtype dtype;
  const void* x;       // (m, k) activations
  const void* values;  // (k / 32, 2 n) int32 kept codes (docs/SPARSE_FORMAT.md)
  const void* meta;    // (k / 32, n) int32 positions
  const void* scales;  // (k / group_size, n) scales in the grouped order, x's dtype
  void* y;             // (m, n) output, x's dtype
  float* workspace;    // sparse_workspace_floats(m, k, n) floats, any contents
  int* locks;          // lock_count(m, n) ints: zeroed here, unless locks_zeroed
  bool locks_zeroed;   // locks are all 0 on entry (they are 0 again on exit)
  int m, k, n;
  int group_size;      // 32, 64, 128, or k (per-channel)
  bool may_overlap = true;  // as MarlinProblem::may_overlap
};

// Scratch the caller must provide (locks: lock_count(m, n), as the dense path).
size_t sparse_workspace_floats(int m, int k, int n);

// nullptr if the kernel supports the shapes, else a message saying why not.
const char* sparse_unsupported_reason(int m, int k, int n, int group_size);

// One-time set-up of every sparse kernel instance on the current device.
cudaError_t prepare_sparse_kernels();

// Enqueues the whole product on `stream` (a lock reset unless locks_zeroed,
// then one launch per chunk of up to 128 rows of x). Capturable in a CUDA graph.
cudaError_t sparse_matmul(const SparseProblem& problem, cudaStream_t stream);

}  // namespace jax_marlin::cuda
