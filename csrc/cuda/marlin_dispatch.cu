// The dispatch table: which tile configurations exist, which one a problem
// gets, and the launch of the chosen template instance. Instances are
// generated from kTileConfigs by templates; nothing here is enumerated by hand.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <utility>

#include "launch_util.h"
#include "marlin_kernel.cuh"
#include "marlin_launch.h"
#include "prefill_launch.h"

namespace jax_marlin::cuda {
namespace {

struct TileConfig {
  int n_blocks, k_blocks, warps;
  // The fewest tiles of the layer for which the configuration is used: a
  // long tile on a small layer leaves too few tiles to balance the stripes.
  int min_tiles = 0;
  // Hopper's wgmma (TileShape::kWgmma), with x by TMA only, in builds with
  // sm_90a code: launched where wgmma_launches() says so, else the next
  // configuration in preference() serves.
  bool wgmma = false;
  constexpr int tile_n() const { return 16 * n_blocks; }
  constexpr int tile_k() const { return 16 * k_blocks; }
  constexpr bool serves(int k, int n) const { return tile_serves(k, n, tile_k(), tile_n(), min_tiles); }
};

// k x n tiles: 256x128 and 128x256; 128x128 where those do not divide
// (K, N); 64x64 is the fallback that covers every K, N multiple of 64.
// At M <= 16, 256x256 on layers of at
// least 512 such tiles: the small-M loop is latency-bound, and a stage
// twice as large halves the barriers and stage switches per byte (H200
// tile sweep, us: 8192x28672 M=1 45.6 -> 40.2, M=8 48.3 -> 41.9, M=16
// 54.0 -> 49.7; 8192^2 M=1 18.6 -> 16.6; on 4096^2, 256 tiles, 3-10%
// slower). (Measured and left out, H200: 512x128 at M <= 8, 1-5% behind
// 256x256; 128x512 with one warp a slab at 8 row blocks, so that each
// dequantized weight feeds 8 MMAs instead of 4: 4-7% faster on the two
// widest 70B layers at M = 64, but up to 2x slower on the 7B layers, whose
// stripes it leaves a few tiles long.)
// At 32 and 64 rows on Hopper, 128x256 with wgmma (x by TMA, read through
// 128-byte-swizzle descriptors): a warpgroup a 256-column pair of slabs, so
// each dequantized weight feeds one wgmma m64n64 instead of 4-8 mma.sync.
// H100 kernel benchmark, us, M = 64, against the mma.sync tile with x by
// TMA (session 17): 8192x28672 109.2 -> 82.1, 28672x8192 107.6 -> 79.9,
// 8192^2 38.6 -> 31.1. At M = 32 (session 18, same benchmark): 70.3 ->
// 64.5, 69.6 -> 64.1, 26.4 -> 24.3.
// At 128 rows on Hopper, 128x128 with wgmma (x by TMA): a warpgroup a slab,
// each dequantized weight feeds one m64n128 (the 128x256 wgmma tile would
// give a warpgroup two slabs, 128 accumulators a thread, and spills: 133
// against 122 us in the tile sweep). Against the 128x256 mma.sync tile,
// which stays for devices without wgmma (H100 kernel benchmark, session 18,
// us, M = 128): 8192x28672 187.2 -> 116.7, 28672x8192 182.8 -> 114.8,
// 8192^2 67.2 -> 39.5, 4096^2 38.3 -> 18.2.
// At 32 rows on layers of at least 2048 such tiles, 128x512 with wgmma: a
// warpgroup four slabs, so x is read from L2 once for twice the weight
// bytes (H100 kernel benchmark, session 19, us, M = 32, group 128 /
// per-channel: 8192x28672 64.0 -> 59.1 / 56.1 -> 54.3, 28672x8192 62.6 ->
// 58.6 / 55.2 -> 54.1; on 8192^2, 1024 tiles, 11-17% slower, and worse on
// the 7B layers). At 64 rows it spills (128 accumulators a thread) and
// loses 20-40%; at 128 rows the 128x256 wgmma tile spills too and loses
// 10-25% (tile sweep --wide, session 19).
// Every wgmma configuration runs with a producer warp (ProducerWarp in
// marlin_tiles.h: the copies from a warp of their own, no block-wide
// barrier in the main loop; H100 kernel benchmark, session 20: 5-13%
// faster at M = 32-128 on the 70B layers, 3-10% on the 7B ones).
constexpr std::array<TileConfig, 8> kTileConfigs = {{{8, 16, 8},
                                                     {16, 8, 8},
                                                     {8, 8, 8},
                                                     {4, 4, 4},
                                                     {16, 16, 8, 512},
                                                     {16, 8, 8, 0, true},
                                                     {8, 8, 8, 0, true},
                                                     {32, 8, 8, 2048, true}}};
constexpr int kNumConfigs = static_cast<int>(kTileConfigs.size());

// The wgmma tiles' last wgmma group of a stage trails into the next
// (ProducerWarp's kTrail) on per-channel tiles, where it measured 4-6%
// faster at M = 64-128 (session 21); with group scales it was 2-4% slower
// at M = 64, so those trail only in -DJAX_MARLIN_TRAIL builds (A/B).
#ifdef JAX_MARLIN_TRAIL
constexpr bool kTrailBuild = true;
#else
constexpr bool kTrailBuild = false;
#endif

// Configurations tried for a row variant, in order (-1: none); the first
// that serves (K, N) and can launch here (pick_config) wins. Only these are
// instantiated.
constexpr std::array<int, kNumConfigs> preference(int variant) {
  if (variant == 0) return {4, 0, 1, 2, 3, -1, -1, -1};
  if (variant == 1) return {4, 1, 0, 2, 3, -1, -1, -1};
  if (variant == 2) return {7, 5, 1, 0, 2, 3, -1, -1};
  if (variant == 3) return {5, 1, 0, 2, 3, -1, -1, -1};
  // 128 rows: 128 x 256 (or 128 x 128 with wgmma) only. (The 64 x 64 tile
  // at 16 row blocks is one ptxas 13.0 miscompiles: see stream_stripe.
  // Shapes it would serve run as 64-row chunks instead.)
  return {6, 1, -1, -1, -1, -1, -1, -1};
}

// The kernel of a tile: x by TMA (marlin_kernel_tma_x) or by cp.async.
template <typename T, typename Tile>
constexpr auto kernel_of() {
  if constexpr (Tile::kTmaX) {
    return &marlin_kernel_tma_x<T, Tile>;
  } else {
    return &marlin_kernel<T, Tile>;
  }
}

template <typename T, typename Tile>
cudaError_t prepare_chunk() {
  int resident = 0;
  return resident_blocks_per_sm<kernel_of<T, Tile>(), Tile>(&resident);
}

// One chunk (up to 128 rows) of the product, with a fixed kernel instance.
using ChunkLauncher = cudaError_t (*)(const MarlinProblem&, int row0, int rows, int* locks,
                                      cudaStream_t);
using ChunkPreparer = cudaError_t (*)();

template <typename T, typename Tile>
cudaError_t launch_chunk(const MarlinProblem& pr, int row0, int rows, int* locks,
                         cudaStream_t stream) {
  int resident_per_sm = 0;
  cudaError_t err = resident_blocks_per_sm<kernel_of<T, Tile>(), Tile>(&resident_per_sm);
  if (err != cudaSuccess) return err;

  MarlinParams<T> p;
  p.x = static_cast<const T*>(pr.x) + static_cast<size_t>(row0) * pr.k;
  p.packed = static_cast<const int4*>(pr.packed);
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
  static_assert(Tile::kBlocksPerSM == 1, "workspace_floats sizes the grid at one block per SM");
  p.stripes = stripe_count(total, n_tiles, multiprocessor_count() * resident_per_sm);

  return launch_tile<Tile>(kernel_of<T, Tile>(), stream, p,
                          kLaunchesOverlapping<Tile::kTileM> && pr.may_overlap);
}

// Table index = (((tma_x * 2 + dtype) * 2 + grouped) * kNumRowVariants + variant) *
// kNumConfigs + config; tma_x: x comes in by TMA (x_by_tma).
constexpr int table_index(ActDtype dtype, bool grouped, int variant, int config, bool tma_x) {
  return (((tma_x ? 2 : 0) + static_cast<int>(dtype)) * 2 + (grouped ? 1 : 0)) * kNumRowVariants *
             kNumConfigs +
         variant * kNumConfigs + config;
}

// The kernel instance at table index I, as a launcher (Prepare = false) or
// as its one-time set-up (Prepare = true); nullptr where the tile does not fit.
template <int I, bool Prepare>
constexpr auto table_entry() {
  constexpr int config = I % kNumConfigs;
  constexpr int row_blocks = kRowBlockCounts[(I / kNumConfigs) % kNumRowVariants];
  constexpr bool grouped = (I / (kNumConfigs * kNumRowVariants)) % 2 == 1;
  constexpr bool is_bf16 = (I / (kNumConfigs * kNumRowVariants * 2)) % 2 == 1;
  constexpr bool tma_x = I / (kNumConfigs * kNumRowVariants * 4) == 1;
  constexpr TileConfig c = kTileConfigs[config];
  using T = std::conditional_t<is_bf16, __nv_bfloat16, half>;
  constexpr int variant = (I / kNumConfigs) % kNumRowVariants;
  using Entry = std::conditional_t<Prepare, ChunkPreparer, ChunkLauncher>;
  if constexpr (!tries(preference(variant), config) || (c.wgmma && !(tma_x && kSm90aBuild))) {
    return Entry{nullptr};
  } else {
    using Shape = TileShape<row_blocks, c.n_blocks, c.k_blocks, c.warps, grouped, 1, 1, false, c.wgmma,
                            c.wgmma ? 1 : slab_sharing_warps(row_blocks), tma_x>;
    // wgmma tiles come with a producer warp (ProducerWarp).
    using Tile = std::conditional_t<c.wgmma, ProducerWarp<Shape, kTrailBuild || !grouped>, Shape>;
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
  return first_usable_config(preference(variant), kTileConfigs, k, n, tma_x, wgmma,
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

size_t workspace_floats(int m, int k, int n) {
  // Two partial-sum slots per block of the grid (see MarlinBlock::slot), for
  // the larger of the two kinds of chunk (full, and the remainder); chunks run
  // one after another and reuse it. Sized for the device with the most SMs,
  // so that the size fixed when a program is traced fits any of them.
  size_t most = 0;
  for (int row0 = 0, rows = 0; row0 < m; row0 += rows) {
    rows = next_chunk(m - row0, k, n);
    const int variant = row_variant(rows);
    // Whichever way the device will launch: cp.async, TMA, TMA with wgmma.
    for (int way = 0; way < 3; ++way) {
      const int config = pick_config(variant, k, n, way >= 1, way == 2);
      if (config < 0) continue;
      const TileConfig& c = kTileConfigs[config];
      const size_t total = static_cast<size_t>(k / c.tile_k()) * (n / c.tile_n());
      const size_t grid = std::min(total, static_cast<size_t>(max_multiprocessor_count()));
      most = std::max(most, 2 * grid * (8 * kRowBlockCounts[variant]) * c.tile_n());
    }
  }
  // The prefill kernel's K split, where it may run instead of the chunks.
  return std::max(most, routed_prefill_workspace_floats(m));
}

size_t lock_count(int m, int n) {
  // One lock per 64-column slab for each chunk (chunk_rows), in both the
  // dense and the 2:4 sparse kernel; also more than the prefill kernel's
  // tile counters (tiles of at least 64 rows and 128 columns).
  return static_cast<size_t>((m + kMinChunkRows - 1) / kMinChunkRows) * (n / kWarpCols);
}

const char* unsupported_reason(int m, int k, int n, int group_size) {
  if (m < 1) return "the kernel needs at least one row of x";
  if (k <= 0 || k % 64 != 0) return "K must be a positive multiple of 64";
  if (n <= 0 || n % 64 != 0) return "N must be a positive multiple of 64";
  if (group_size != k && group_size != 32 && group_size != 64 && group_size != 128)
    return "group size must be 32, 64, 128 or K (per-channel)";
  return nullptr;
}

cudaError_t prepare_kernels() {
  // Only the instances this device launches (x by TMA or not: x_by_tma).
  const size_t half = kPreparers.size() / 2;
  for (size_t i = x_by_tma() ? half : 0, end = i + half; i < end; ++i) {
    if (kPreparers[i] == nullptr) continue;
    if (cudaError_t err = kPreparers[i](); err != cudaSuccess) return err;
  }
  return prepare_prefill_kernels();
}

cudaError_t marlin_matmul(const MarlinProblem& pr, cudaStream_t stream) {
  if (unsupported_reason(pr.m, pr.k, pr.n, pr.group_size) != nullptr) return cudaErrorInvalidValue;
  // Every launch needs zeroed locks; the kernel leaves them zeroed, so only
  // a buffer of unknown contents (e.g. fresh scratch) needs this reset.
  cudaError_t err = cudaSuccess;
  if (!pr.locks_zeroed) {
    err = cudaMemsetAsync(pr.locks, 0, lock_count(pr.m, pr.n) * sizeof(int), stream);
    if (err != cudaSuccess) return err;
  }
  // From 64 rows on, the prefill kernel may take the whole product
  // (routed_prefill_problem; on the H100 1.1-3x the chunks at M = 256-2048,
  // session 27, and with its K split and 64-row tiles up to 1.2x at M =
  // 128, session 28).
  const PrefillProblem prefill = routed_prefill_problem(
      {pr.dtype, pr.x, pr.packed, pr.scales, pr.y, pr.m, pr.k, pr.n, pr.group_size}, pr.workspace, pr.locks);
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
