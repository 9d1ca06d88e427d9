// Dispatch of the 2:4 sparse kernel: its tile table, the choice per problem,
// the launch. Mirrors marlin_dispatch.cu (instances generated from
// kSparseConfigs by templates; nothing enumerated by hand).
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <utility>

#include "launch_util.h"
#include "prefill_launch.h"
#include "sparse_kernel.cuh"
#include "sparse_launch.h"

namespace jax_marlin::cuda {
namespace {

struct SparseConfig {
  int n_blocks, bands, warps;
  int min_tiles = 0;  // as TileConfig::min_tiles
  // Hopper's wgmma.mma_async.sp (SparseTileShape::kWgmma), as
  // TileConfig::wgmma: x by TMA only, sm_90a builds, where wgmma_launches().
  bool wgmma = false;
  constexpr int tile_n() const { return 16 * n_blocks; }
  constexpr int tile_k() const { return 32 * bands; }
  constexpr bool serves(int k, int n) const { return tile_serves(k, n, tile_k(), tile_n(), min_tiles); }
};

// k x n tiles. Per stage a band of a run costs 768 bytes of weight (512 of
// values, 256 of metadata) but 64 bytes of x per row of x, so the k-tile
// shrinks as M grows: 512 x 128 (M <= 16), 128 x 256 (M up to 64), 256 x 128
// where those do not divide (K, N), and 64 x 64, which covers every K, N
// multiple of 64. At M <= 16, 256 x 256 first on layers of at least 512
// such tiles, as the dense kernel does: the same 32-36 KB stage as 512 x
// 128, but four warps along N and a 2-way K split instead of two and four,
// so half the shared-memory reduction per tile (H200, us: 70B layers at
// M = 16 43.1 -> 40.6 with group scales, 43.2 -> 37.5 per-channel; M = 1
// flat). Tiles whose stages do not fit (kFits) drop out.
// At 32, 64 and 128 rows on Hopper, wgmma.mma_async.sp tiles (x by TMA): a
// warpgroup takes a 64-column run (or two), each dequantized weight feeds one
// m64nMk32 instead of M / 16 mma.sp; 256 x 256, 256 x 128 and 128 x 128 were
// the fastest of the sparse tile sweep's candidates at those M on all four
// Llama layer shapes (H100, us, 28672x8192 fp16 g128, against the mma.sp
// tile: M = 32 52.7 -> 40.5, M = 64 86.5 -> 56.5, M = 128 149.8 -> 92.1;
// benchmarks/results/sweeps/s18_h100_20261206/call1/sparse_sweep.log).
constexpr std::array<SparseConfig, 8> kSparseConfigs = {{{8, 16, 8},
                                                         {16, 4, 8},
                                                         {8, 8, 8},
                                                         {4, 2, 2},
                                                         {16, 8, 8, 512},
                                                         {16, 8, 8, 0, true},
                                                         {8, 8, 8, 0, true},
                                                         {8, 4, 8, 0, true}}};
constexpr int kNumConfigs = static_cast<int>(kSparseConfigs.size());

// Configurations tried for a row variant, in order (-1: none); the first
// that serves (K, N) and can launch here (pick_config) wins. Only these are
// instantiated. 128 rows: the wgmma tile, else 128 x 256 only (the others
// do not fit shared memory at 16 row blocks, or are slower than two 64-row
// chunks would be); shapes 128 x 256 does not divide run as 64-row
// chunks (next_chunk).
constexpr std::array<int, kNumConfigs> preference(int variant) {
  if (variant <= 1) return {4, 0, 2, 1, 3, -1, -1, -1};
  if (variant == 2) return {5, 1, 2, 0, 3, -1, -1, -1};
  if (variant == 3) return {6, 1, 2, 0, 3, -1, -1, -1};
  return {7, 1, -1, -1, -1, -1, -1, -1};
}

// The kernel of a tile: x by TMA (sparse_kernel_tma_x) or by cp.async.
template <typename T, typename Tile>
constexpr auto kernel_of() {
  if constexpr (Tile::kTmaX) {
    return &sparse_kernel_tma_x<T, Tile>;
  } else {
    return &marlin_sparse_kernel<T, Tile>;
  }
}

template <typename T, typename Tile>
cudaError_t prepare_chunk() {
  int resident = 0;
  return resident_blocks_per_sm<kernel_of<T, Tile>(), Tile>(&resident);
}

using ChunkLauncher = cudaError_t (*)(const SparseProblem&, int row0, int rows, int* locks,
                                      cudaStream_t);
using ChunkPreparer = cudaError_t (*)();

template <typename T, typename Tile>
cudaError_t launch_chunk(const SparseProblem& pr, int row0, int rows, int* locks,
                         cudaStream_t stream) {
  int resident_per_sm = 0;
  cudaError_t err = resident_blocks_per_sm<kernel_of<T, Tile>(), Tile>(&resident_per_sm);
  if (err != cudaSuccess) return err;

  SparseParams<T> p;
  p.x = static_cast<const T*>(pr.x) + static_cast<size_t>(row0) * pr.k;
  p.values = static_cast<const int4*>(pr.values);
  p.meta = static_cast<const int4*>(pr.meta);
  p.scales = static_cast<const T*>(pr.scales);
  p.y = static_cast<T*>(pr.y) + static_cast<size_t>(row0) * pr.n;
  p.workspace = pr.workspace;
  p.locks = locks;
  p.rows = rows;
  p.k = pr.k;
  p.n = pr.n;
  p.group_shift = Tile::kGrouped ? log2_exact(pr.group_size) : 0;
  // At most one stripe per resident block (stripe_count): the workspace
  // holds two slots for each.
  const int n_tiles = pr.n / Tile::kTileN;
  const int total = (pr.k / Tile::kTileK) * n_tiles;
  static_assert(Tile::kBlocksPerSM == 1, "sparse_workspace_floats sizes the grid at one block per SM");
  p.stripes = stripe_count(total, n_tiles, multiprocessor_count() * resident_per_sm);

  return launch_tile<Tile>(kernel_of<T, Tile>(), stream, p,
                          kLaunchesOverlapping<Tile::kTileM> && pr.may_overlap);
}

// As marlin_dispatch.cu's table_index.
constexpr int table_index(ActDtype dtype, bool grouped, int variant, int config, bool tma_x) {
  return (((tma_x ? 2 : 0) + static_cast<int>(dtype)) * 2 + (grouped ? 1 : 0)) * kNumRowVariants *
             kNumConfigs +
         variant * kNumConfigs + config;
}

template <int I, bool Prepare>
constexpr auto table_entry() {
  constexpr int config = I % kNumConfigs;
  constexpr int row_blocks = kRowBlockCounts[(I / kNumConfigs) % kNumRowVariants];
  constexpr bool grouped = (I / (kNumConfigs * kNumRowVariants)) % 2 == 1;
  constexpr bool is_bf16 = (I / (kNumConfigs * kNumRowVariants * 2)) % 2 == 1;
  constexpr bool tma_x = I / (kNumConfigs * kNumRowVariants * 4) == 1;
  constexpr SparseConfig c = kSparseConfigs[config];
  using T = std::conditional_t<is_bf16, __nv_bfloat16, half>;
  constexpr int variant = (I / kNumConfigs) % kNumRowVariants;
  using Entry = std::conditional_t<Prepare, ChunkPreparer, ChunkLauncher>;
  if constexpr (!tries(preference(variant), config) || (c.wgmma && !(tma_x && kSm90aBuild))) {
    return Entry{nullptr};
  } else {
    using Shape = SparseTileShape<row_blocks, c.n_blocks, c.bands, c.warps, grouped,
                                  c.wgmma ? 1 : slab_sharing_warps(row_blocks), tma_x, c.wgmma>;
    // Per-channel wgmma tiles of 32 and 128 rows come with a producer warp
    // (ProducerWarp), as the dense ones. H100 kernel benchmark (session 22,
    // ABAB x3): per-channel M = 32 4-8% faster, M = 128 6-14% (28672x8192
    // 88.8 -> 76.8 us); group 128 and M = 64 untouched. With group scales,
    // and at 64 rows (8 row blocks: the 128x128 tile's 17-25 copies a stage
    // from one warp), the producer was slower (session 21).
    constexpr bool kProducer = c.wgmma && !grouped && row_blocks != 8;
    using Tile = std::conditional_t<kProducer, ProducerWarp<Shape>, Shape>;
    if constexpr (!Tile::kFits) {
      return Entry{nullptr};
    } else if constexpr (Prepare) {
      return Entry{&prepare_chunk<T, Tile>};
    } else {
      return Entry{&launch_chunk<T, Tile>};
    }
  }
}

template <bool Prepare, int... I>
constexpr auto make_table(std::integer_sequence<int, I...>) {
  return std::array{table_entry<I, Prepare>()...};
}

constexpr auto kTableSize = std::make_integer_sequence<int, 2 * 2 * 2 * kNumRowVariants * kNumConfigs>{};
constexpr auto kLaunchers = make_table<false>(kTableSize);
constexpr auto kPreparers = make_table<true>(kTableSize);

// The configuration for a row variant on (K, N) (first_usable_config).
int pick_config(int variant, int k, int n, bool tma_x, bool wgmma) {
  return first_usable_config(preference(variant), kSparseConfigs, k, n, tma_x, wgmma,
                             [variant](int c, bool grouped, bool tma) {
                               return kLaunchers[table_index(ActDtype::kFloat16, grouped, variant, c, tma)] !=
                                      nullptr;
                             });
}

// Rows of the next chunk (see chunk_rows in marlin_tiles.h).
int next_chunk(int remaining, int k, int n) {
  return chunk_rows(remaining, pick_config(row_variant(kMaxRows), k, n, false, false) >= 0);
}

}  // namespace

size_t sparse_workspace_floats(int m, int k, int n) {
  // As workspace_floats: two slots per block of the larger chunk kind's grid,
  // sized for the device with the most SMs.
  size_t most = 0;
  for (int row0 = 0, rows = 0; row0 < m; row0 += rows) {
    rows = next_chunk(m - row0, k, n);
    const int variant = row_variant(rows);
    // Whichever way the device will launch: cp.async, TMA, TMA with wgmma.
    for (int way = 0; way < 3; ++way) {
      const int config = pick_config(variant, k, n, way >= 1, way == 2);
      if (config < 0) continue;
      const SparseConfig& c = kSparseConfigs[config];
      const size_t total = static_cast<size_t>(k / c.tile_k()) * (n / c.tile_n());
      const size_t grid = std::min(total, static_cast<size_t>(max_multiprocessor_count()));
      most = std::max(most, 2 * grid * (8 * kRowBlockCounts[variant]) * c.tile_n());
    }
  }
  // The prefill kernel's K split, where it may run instead of the chunks.
  return std::max(most, routed_prefill_workspace_floats(m));
}

const char* sparse_unsupported_reason(int m, int k, int n, int group_size) {
  // Every shape the sparse format allows is covered by the 64 x 64 tile.
  return unsupported_reason(m, k, n, group_size);
}

cudaError_t prepare_sparse_kernels() {
  // Only the instances this device launches (x by TMA or not: x_by_tma).
  const size_t half = kPreparers.size() / 2;
  for (size_t i = x_by_tma() ? half : 0, end = i + half; i < end; ++i) {
    if (kPreparers[i] == nullptr) continue;
    if (cudaError_t err = kPreparers[i](); err != cudaSuccess) return err;
  }
  return prepare_prefill_kernels();
}

cudaError_t sparse_matmul(const SparseProblem& pr, cudaStream_t stream) {
  if (sparse_unsupported_reason(pr.m, pr.k, pr.n, pr.group_size) != nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  if (!pr.locks_zeroed) {
    err = cudaMemsetAsync(pr.locks, 0, lock_count(pr.m, pr.n) * sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  // From 64 rows on, the prefill kernel's 2:4 form may take the whole
  // product (routed_prefill_problem; on the H100 1.4-1.6x the 2:4 chunks at
  // M = 128-256 on the 70B shapes, session 28).
  PrefillProblem prefill{pr.dtype, pr.x, pr.values, pr.scales, pr.y, pr.m, pr.k, pr.n, pr.group_size};
  prefill.meta = pr.meta;
  prefill = routed_prefill_problem(prefill, pr.workspace, pr.locks);
  if (prefill.variant >= 0) return prefill_matmul(prefill, stream);
  const bool grouped = pr.group_size != pr.k;
  const int locks_per_chunk = pr.n / kWarpCols;
  const bool tma_x = x_by_tma(), wgmma = tma_x && wgmma_launches();
  for (int row0 = 0, chunk = 0, rows = 0; row0 < pr.m; row0 += rows, ++chunk) {
    rows = next_chunk(pr.m - row0, pr.k, pr.n);
    const int variant = row_variant(rows);
    const int config = pick_config(variant, pr.k, pr.n, tma_x, wgmma);
    if (config < 0) return cudaErrorInvalidValue;
    err = kLaunchers[table_index(pr.dtype, grouped, variant, config, tma_x)](
        pr, row0, rows, pr.locks + chunk * locks_per_chunk, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace jax_marlin::cuda
