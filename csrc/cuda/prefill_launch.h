// Framework-free entry point of the prefill kernel (prefill_kernel.cuh):
// y = x W for M of a hundred rows and more, on sm_90a.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "marlin_launch.h"  // ActDtype

namespace jax_marlin::cuda {

// Tile shapes, by consumer warpgroups x 64-column slabs each, at 128 or 64
// rows of x: 0: 4 x 1 (128 x 256 tile), 1: 2 x 2 (128 x 256), 2: 2 x 1
// (128 x 128), 3: 4 x 1 at 64 rows (64 x 256), 4: 2 x 1 at 64 rows (64 x 128).
inline constexpr int kPrefillVariants = 5;
// The most shares of K one tile is split into (PrefillProblem::splits).
inline constexpr int kPrefillMaxSplits = 4;
// From this many rows of x on, marlin_matmul and sparse_matmul ask
// pick_prefill_shape whether the prefill kernel runs the product.
inline constexpr int kPrefillMinRows = 64;

struct PrefillProblem {
  ActDtype dtype;
  const void* x;       // (m, k) activations
  const void* packed;  // (k / 16, 2 n) int32, Marlin layout; 2:4: (k / 32, 2 n) kept values
  const void* scales;  // (k / group_size, n) permuted scales, same dtype as x (2:4: the grouped order)
  void* y;             // (m, n) output, same dtype as x
  int m, k, n;
  int group_size;      // 32, 64, 128, or k (per-channel)
  int variant = 0;     // a tile shape, above
  // Blocks a tile, each taking an equal share of K, 1 to kPrefillMaxSplits
  // (at most K / 64). With more than one, the launch needs `partials`
  // (prefill_partial_floats, any contents) and `counters` (one zeroed int a
  // tile of y, left zeroed).
  int splits = 1;
  float* partials = nullptr;
  int* counters = nullptr;
  // 2:4 sparse weights (docs/SPARSE_FORMAT.md) where not null: (k / 32, n)
  // int32 positions, `packed` holding the kept values. Every variant but 1.
  const void* meta = nullptr;
};

// nullptr if the prefill kernel runs the problem on the current device,
// else a message saying why not (its shapes, variant and split; a split's
// scratch buffers are prefill_matmul's to check).
const char* prefill_unsupported_reason(const PrefillProblem& problem);

// The float32 workspace a launch of `problem` needs (0 without a K split).
size_t prefill_partial_floats(const PrefillProblem& problem);
// Tiles of y of the problem's variant (the counters it needs).
int prefill_tiles(const PrefillProblem& problem);
// The most prefill_partial_floats of any problem pick_prefill_shape
// returns, on any visible device: a K split only fills SMs, so its blocks
// never outnumber them.
size_t prefill_partial_floats_bound();

// How the prefill kernel runs `problem` (its variant and splits ignored) on
// the current device: the variant and K split with the least estimated time
// (waves of blocks x stages a block x a stage's time, plus the split's
// reduction), as {variant, splits}; variant -1 where that launch would make
// under a third (2:4: half) of the output of full waves of 4x1 tiles in the
// same time (the chunks are then the better choice), or where the device
// cannot run the kernel. A K split never has more blocks than SMs.
struct PrefillShape {
  int variant = -1, splits = 1;
};
PrefillShape pick_prefill_shape(const PrefillProblem& problem);
// The same choice for a device of `sms` SMs that runs the kernel, from the
// shapes alone (no device query: the tests check it on any machine), for
// dense or 2:4 weights.
PrefillShape prefill_shape_for(int m, int k, int n, int group_size, int sms, bool sparse = false);
// Rows and columns of y a tile of `variant` covers.
struct PrefillTileSize {
  int rows, cols;
};
PrefillTileSize prefill_tile_size(int variant);

// The prefill launch for a product marlin_matmul or sparse_matmul was given
// (`problem`'s variant and splits ignored): from kPrefillMinRows rows of x
// on, pick_prefill_shape's choice, a K split's parts in `workspace` and its
// tile counters in `locks` (the caller's scratch, of the sizes below);
// variant -1 where the caller's 128-row chunks run it. JAX_MARLIN_PREFILL=0
// keeps every M on the chunks (an A/B switch, read once).
PrefillProblem routed_prefill_problem(PrefillProblem problem, float* workspace, int* locks);
// What routed_prefill_problem may put in a workspace for M rows of x, in
// floats (workspace_floats and sparse_workspace_floats add it); the locks
// it uses are fewer than lock_count(m, n).
size_t routed_prefill_workspace_floats(int m);

// One-time set-up of every prefill instance on the current device (shared-
// memory limits); prefill_matmul does it lazily otherwise. Not in a capture.
cudaError_t prepare_prefill_kernels();

// Enqueues the product on `stream`: one launch.
cudaError_t prefill_matmul(const PrefillProblem& problem, cudaStream_t stream);

}  // namespace jax_marlin::cuda
