// Framework-free entry point of the prefill kernel (prefill_kernel.cuh):
// y = x W for M of a few hundred rows and more, on sm_90a.
#pragma once

#include <cuda_runtime.h>

#include "marlin_launch.h"  // ActDtype

namespace jax_marlin::cuda {

// Tile shapes, by consumer warpgroups x 64-column slabs each:
// 0: 4 x 1 (128 x 256 tile), 1: 2 x 2 (128 x 256), 2: 2 x 1 (128 x 128).
inline constexpr int kPrefillVariants = 3;

struct PrefillProblem {
  ActDtype dtype;
  const void* x;       // (m, k) activations
  const void* packed;  // (k / 16, 2 n) int32, Marlin layout
  const void* scales;  // (k / group_size, n) permuted scales, same dtype as x
  void* y;             // (m, n) output, same dtype as x
  int m, k, n;
  int group_size;      // 32, 64, 128, or k (per-channel)
  int variant = 0;     // a tile shape, above
};

// nullptr if the prefill kernel runs the problem on the current device,
// else a message saying why not.
const char* prefill_unsupported_reason(const PrefillProblem& problem);

// The variant the prefill kernel runs `problem` (its variant ignored) with
// on the current device: of 4x1 and 2x1, the one with the fewer waves of
// tiles weighted by a tile's time; -1 where its tiles would leave more than
// half the SMs idle (the Marlin kernel's chunks are then the better choice).
int pick_prefill_variant(const PrefillProblem& problem);

// One-time set-up of every prefill instance on the current device (shared-
// memory limits); prefill_matmul does it lazily otherwise. Not in a capture.
cudaError_t prepare_prefill_kernels();

// Enqueues the product on `stream`: one launch, no workspace.
cudaError_t prefill_matmul(const PrefillProblem& problem, cudaStream_t stream);

}  // namespace jax_marlin::cuda
