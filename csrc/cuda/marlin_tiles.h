// Tile geometry of the Marlin kernel: every size the kernel and its launcher
// derive from a tile configuration lives here, as compile-time constants.
#pragma once

#include <array>
#include <cstddef>

namespace jax_marlin::cuda {

// Fixed by the packed format: one 16-byte load per lane covers a 16 x 64
// (k x n) slab, i.e. one warp owns 64 output columns.
inline constexpr int kWarpCols = 64;
// Rows of activations handled by one launch (16 blocks of 8), in both the
// dense and the 2:4 sparse kernel; larger M is split into chunks.
inline constexpr int kMaxRows = 128;

// A chunk of `rows` rows runs with 1, 2, 4, 8 or 16 blocks of 8 rows (rounded
// up: padding rows cost no bytes, but from M = 32 up they cost MMAs, which
// are then what limits the kernels). The dispatch tables index by variant.
inline constexpr int kRowBlockCounts[] = {1, 2, 4, 8, 16};
inline constexpr int kNumRowVariants = 5;
constexpr int row_variant(int rows) {
  return rows <= 8 ? 0 : rows <= 16 ? 1 : rows <= 32 ? 2 : rows <= 64 ? 3 : 4;
}
// Warps that share a 64-column slab: at 8 and 16 row blocks, two (64 and
// 128 accumulators a thread; 8 row blocks with a K split would not fit
// shared memory otherwise). The dense kernel splits the slab by columns
// (TileShape::kWarpsJ: each weight dequantized once; 5-7% faster at M = 64
// than the row split on the H100, session 15), the 2:4 kernel by rows
// (SparseTileShape::kWarpsM: its column split measured even there).
constexpr int slab_sharing_warps(int row_blocks) { return row_blocks >= 8 ? 2 : 1; }

// Rows of the next chunk when `remaining` rows are left; `full_pass`: the
// problem has a tile for 128 rows. A 128-row chunk streams the weights once
// for all its rows (M = 128 on the 70B layers, dense: 224 against 262 us as
// two 64-row chunks, H200), but only pays when it is mostly real rows;
// below 97 rows, 64 plus the rest is faster. So every chunk but the last
// has at least kMinChunkRows rows (what the lock buffers are sized by).
inline constexpr int kMinChunkRows = 64;
constexpr int chunk_rows(int remaining, bool full_pass) {
  return remaining > 96 && full_pass ? (remaining < kMaxRows ? remaining : kMaxRows)
                                     : (remaining < kMinChunkRows ? remaining : kMinChunkRows);
}
// Whether a kernel of kTileM rows is launched as a programmatic dependent
// launch (overlap_previous_grid in stripe.cuh; sm_90+): up to 16 rows. The
// overlap hides part of the next kernel's start behind the previous one's
// tail, which pays where that start is a large part of the call (H200
// kbench, M = 1: 6-10% on the 7B layers). Wider gains nothing measurable:
// H100 kbench (session 13) up to 32 rows -0.5% at M = 32 in the median
// (-3.1..+1.5% by layer), up to 64 rows mixed at M = 64 (-4.8% on 4096^2,
// +2.4% on the large 2:4 layers with group 128), though the self-tests'
// back-to-back chains are bit-exact with either.
template <int kTileM>
inline constexpr bool kLaunchesOverlapping = kTileM <= 16;
// log2 of a power of two: a group size's (group_shift), or the rows along K
// a tile or a warp's share of it spans, which are compared with it.
constexpr int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}
// Whether `config` is among the tile configurations a row variant tries,
// in its dispatch table's order (-1: none): only those are instantiated.
template <std::size_t kN>
constexpr bool tries(const std::array<int, kN>& order, int config) {
  for (int c : order)
    if (c == config) return true;
  return false;
}
// Whether a tile_k x tile_n tile serves a K x N layer, in both kernels'
// dispatch tables: it divides the layer, and the layer has at least
// `min_tiles` of it (a long tile on a small layer leaves too few tiles to
// balance the stripes).
constexpr bool tile_serves(int k, int n, int tile_k, int tile_n, int min_tiles) {
  return k % tile_k == 0 && n % tile_n == 0 && (k / tile_k) * (n / tile_n) >= min_tiles;
}
// Both kernels' choice of a configuration for a row variant on (K, N): the
// first of `order` that serves (K, N) and can launch here. A wgmma
// configuration needs x by TMA (`tma_x`) and wgmma (`wgmma`:
// wgmma_launches()); every other one must have an instance for both ways of
// loading x (`has_instance(config, grouped, tma)`; shared-memory fit depends
// only on the shapes), so that the choice, and the workspace sized from it,
// does not depend on the device but for wgmma. -1: none.
template <typename Config, std::size_t kN, typename HasInstance>
int first_usable_config(const std::array<int, kN>& order, const std::array<Config, kN>& configs, int k,
                        int n, bool tma_x, bool wgmma, HasInstance has_instance) {
  for (int c : order) {
    if (c < 0) break;
    const bool is_wgmma = configs[c].wgmma;
    bool usable = !is_wgmma || (tma_x && wgmma);
    for (bool grouped : {false, true})
      for (bool tma : {false, true})
        if (tma || !is_wgmma) usable = usable && has_instance(c, grouped, tma);
    if (usable && configs[c].serves(k, n)) return c;
  }
  return -1;
}

// Shared-memory budget per block. 160 KiB fits every sm_80+ part that has
// the 164 KiB carve-out (A100, H100); the pipeline takes as many stages as fit.
// Tuning builds may set another (-DJAX_MARLIN_SMEM_BUDGET_KB=224: what
// Hopper's 227 KiB would buy); production builds never do.
#ifdef JAX_MARLIN_SMEM_BUDGET_KB
inline constexpr int kSmemBudget = JAX_MARLIN_SMEM_BUDGET_KB * 1024;
#else
inline constexpr int kSmemBudget = 160 * 1024;
#endif
#ifdef JAX_MARLIN_MAX_STAGES  // tuning builds only, as the budget above
inline constexpr int kMaxStages = JAX_MARLIN_MAX_STAGES;
#else
inline constexpr int kMaxStages = 16;
#endif

// x by TMA (kTmaX tiles, both kernels): the 16-byte units a block needs
// besides its stages, for one 8-byte mbarrier a stage and the slack to align
// the stages to `align` bytes (the dynamic buffer starts after the static
// variables); and a stage's size, padded to 1024 bytes where the copy
// engine's 128-byte swizzle (which repeats every 1024) lays out x.
constexpr int tma_x_units(bool tma_x, int align) { return tma_x ? (kMaxStages + 1) / 2 + align / 16 : 0; }
constexpr int tma_x_stage(bool swizzled, int units) { return swizzled ? (units + 63) / 64 * 64 : units; }

// The kernel computes y^T = W^T x^T: the dequantized weight is the 16 x 16
// A operand of mma.m16n8k16 (16 output columns) and the activations the
// k16 x n8 B operand (8 rows of x). At M <= 8 that is one MMA per packed word
// instead of two with x as A (whose 16 rows would be mostly padding).
//
// kRowBlocks: 8-row blocks of activations (1, 2, 4 or 8); kNBlocks /
// kKBlocks: 16-wide blocks of the output / reduction dimension per tile;
// kWarps: warps per block; kBlocksPerSM: resident blocks per SM the tile is
// built for (they split the shared-memory budget, and registers are capped
// to fit them); kWarpsM: warps that share a 64-column slab, each taking
// kRowBlocks / kWarpsM of the row blocks (at 8 row blocks one warp's 128
// accumulators would not fit its registers).
// kLoadsOnly is a measuring probe for the tuning tools, never dispatched: the
// kernel streams its tiles through the pipeline but skips the math, which
// shows what the memory pipeline alone reaches.
// kWarpsJ: two warps that share a slab by columns instead (each takes two
// of its n16 sub-tiles and all the row blocks): unlike the M split,
// every dequantized weight is dequantized once and feeds all kRowBlocks MMAs.
// kWgmma (sm_90a only): a warpgroup (4 warps) multiplies a 64-column slab by
// all kTileM rows with one wgmma.m64n{kTileM}k16 per k16 block, warp w
// supplying columns 16 w .. 16 w + 15 of the slab (its word w of each
// packed 16-byte unit) as register A fragments; x^T comes from shared memory
// in the canonical no-swizzle layout. mma.sync's issue rate is what limits
// the other tiles at M >= 32.
// kTmaX (what the dispatch launches on compute capability 9.0+, x_by_tma):
// x comes into the stages by TMA, issued by one thread and completed on an
// mbarrier a stage, instead of kAStage cp.async spread over the threads
// (ncu: the wgmma tiles stall on the LSU taking those copies' addresses;
// the mma.sync tiles at M >= 32 are issue-bound). H100 kernel benchmark,
// every production tile: 7-16% faster on the 70B layers at every M, dense
// and 2:4 (benchmarks/NOTES.md, session 16).
// One copy a 64-column half of the tile, with the copy engine's 128-byte
// swizzle (marlin_kernel.cuh, SwizzledX): mma.sync tiles read it with
// ldmatrix, wgmma tiles through 128-byte-swizzle descriptors (two copies a
// stage instead of one a 16-byte column in wgmma's no-swizzle layout: the
// loads-only wgmma tile took 76.6 us at M = 64 on 8192x28672 that way,
// against 56.2 for the mma.sync tile's two). The kernel then takes a tensor
// map of x (marlin_kernel_tma_x).
template <int kRowBlocks_, int kNBlocks_, int kKBlocks_, int kWarps_, bool kGrouped_,
          int kBlocksPerSM_ = 1, int kWarpsM_ = 1, bool kLoadsOnly_ = false, bool kWgmma_ = false,
          int kWarpsJ_ = 1, bool kTmaX_ = false>
struct TileShape {
  static constexpr int kRowBlocks = kRowBlocks_, kNBlocks = kNBlocks_, kKBlocks = kKBlocks_;
  static constexpr int kWarps = kWarps_;
  static constexpr bool kGrouped = kGrouped_;
  static constexpr int kBlocksPerSM = kBlocksPerSM_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr bool kLoadsOnly = kLoadsOnly_;
  static constexpr bool kWgmma = kWgmma_;
  static constexpr int kWarpsJ = kWarpsJ_;
  static constexpr bool kTmaX = kTmaX_;
  // kProducerWarp, kTrail: set by ProducerWarp<...> (below); false here.
  static constexpr bool kProducerWarp = false;
  static constexpr bool kTrail = false;
  // kTmaX: elements of K a TMA box of x spans (a 128-byte swizzled half,
  // which ldmatrix and wgmma's descriptors both read).
  static constexpr int kXBoxK = 64;
  static constexpr int kRowBlocksPerWarp = kRowBlocks / kWarpsM;

  static constexpr int kThreads = kWarps * 32;
  // Threads a block is launched with: kThreads, and a producer warp's
  // where the tile has one (ProducerWarp).
  static constexpr int kBlockThreads = kThreads;
  static constexpr int kTileM = 8 * kRowBlocks, kTileN = 16 * kNBlocks, kTileK = 16 * kKBlocks;
  // 64-column slabs of the tile (the packed layout's unit along N).
  static constexpr int kSlabs = kTileN / kWarpCols;
  // wgmma: a warpgroup takes more than one slab where the tile has more
  // slabs than the block has warpgroups (each x stage then feeds more
  // columns); with mma.sync a warp takes (a share of) one slab.
  static constexpr int kSlabsPerWarpgroup = kWgmma && kSlabs > kWarps / 4 ? kSlabs / (kWarps / 4) : 1;
  // n16 sub-tiles a warp accumulates: 4 / kWarpsJ of its slab with mma.sync;
  // with wgmma its own one (of the warpgroup's 4) in each of its slabs.
  static constexpr int kSubTilesPerWarp = kWgmma ? kSlabsPerWarpgroup : 4 / kWarpsJ;
  // Warps (warpgroups with wgmma) tile the block's output columns (and, with
  // kWarpsM or kWarpsJ > 1, share slabs); the rest split K and are reduced
  // through shared memory after each tile.
  static constexpr int kWarpsN = kSlabs / kSlabsPerWarpgroup;
  static constexpr int kWarpsMN = kWarpsM * kWarpsN * (kWgmma ? 4 : kWarpsJ);
  static constexpr int kWarpsK = kWarps / kWarpsMN;
  static constexpr int kKBlocksPerWarp = kKBlocks / kWarpsK;

  // Shared memory per pipeline stage, in 16-byte units.
  static constexpr int kAChunksPerRow = kTileK / 8;
  static constexpr int kAStage = kTileM * kAChunksPerRow;
  static constexpr int kBStage = kKBlocks * kSlabs * 32;
  // Scale rows a stage may need: one per group of 32 (the smallest group).
  static constexpr int kScaleRowsMax = kGrouped ? kTileK / 32 : 0;
  // Reduction scratch: a warp's fp32 fragments (4 floats a lane per n16
  // sub-tile and row block), for each warp in the upper half of the K split.
  static constexpr int kRed = (kWarpsK / 2) * kWarpsMN * kRowBlocksPerWarp * kSubTilesPerWarp * 32;
  // kTmaX: the stages' x barriers, after the reduction scratch, and slack
  // (128-byte aligned stages for wgmma's layout, 1024 for the swizzled one).
  static constexpr int kBarrierUnits = tma_x_units(kTmaX, 1024);
  static constexpr int kBlockBudget = kSmemBudget / 16 / kBlocksPerSM;  // 16-byte units
  static constexpr int stages_of(int stage) {
    return (kBlockBudget - kRed - kBarrierUnits) / stage < kMaxStages
               ? (kBlockBudget - kRed - kBarrierUnits) / stage
               : kMaxStages;
  }
  // Per-channel scales: a stage that ends an n-tile for its block also
  // carries that n-tile's scale row (kTileN values), so the epilogue reads
  // them from shared memory, not from global memory on the call's tail
  // (after the cross-block reduction, whose release fences would wait for a
  // load issued before it). Only where the row costs no pipeline stage.
  static constexpr int kChannelRow = kTileN / 8;  // 16-byte units
  static constexpr int kStageNoScales = kAStage + kBStage + kScaleRowsMax * kTileN / 8;
  static constexpr bool kChannelScalesInStage =
      !kGrouped && !kWgmma && !kLoadsOnly &&
      stages_of(kStageNoScales + kChannelRow) == stages_of(kStageNoScales);
  static constexpr int kSStage = kScaleRowsMax * kTileN / 8 + (kChannelScalesInStage ? kChannelRow : 0);
  static constexpr int kStage = tma_x_stage(kTmaX, kAStage + kBStage + kSStage);
  static constexpr int kStages = stages_of(kStage);
  static constexpr int kSmemBytes = 16 * (kStages * kStage + kRed + kBarrierUnits);
  // The pipeline needs at least 3 stages; a tile whose stages do not fit is
  // left out of the dispatch table (and cannot be launched).
  static constexpr bool kFits = kStages >= 3;

  static_assert(kNBlocks % 4 == 0, "a warp owns 64 output columns");
  static_assert(kSlabs % kSlabsPerWarpgroup == 0, "warpgroups must share the slabs evenly");
  static_assert(kRowBlocks % kWarpsM == 0, "the M split must divide the row blocks");
  static_assert(kWarpsJ == 1 || (!kWgmma && kWarpsM == 1 && kWarpsJ == 2),
                "a slab splits by rows or by columns, not both; wgmma tiles split it their own way");
  static_assert(kWarps % kWarpsMN == 0 && kWarpsK >= 1, "warps must tile M and N evenly");
  static_assert(kKBlocks % kWarpsK == 0, "K split must divide the k-tile");
  static_assert((kWarpsK & (kWarpsK - 1)) == 0, "tree reduction needs a power-of-two K split");
  static_assert(kAChunksPerRow >= 8, "the A swizzle permutes groups of 8 chunks");
  static_assert(!kWgmma || (kWarpsM == 1 && kWarps % 4 == 0 &&
                             (kTileM == 8 || kTileM == 16 || kTileM == 32 || kTileM == 64 || kTileM == 128)),
                "wgmma tiles: whole warpgroups, no M split, 8 to 128 rows");
  static_assert(!kTmaX || kTileK % 64 == 0,
                "x by TMA with the 128-byte swizzle: whole 64-column halves");
};

// A kTmaX wgmma tile (TileShape, or SparseTileShape for the 2:4 kernel)
// whose copies come from a warp of their own (what both dispatch tables
// launch for every wgmma configuration): the block's kWarps
// warps only wait for stages, dequantize and multiply; one more warp issues
// each stage's copies, x by TMA and the weights and group-scale rows by 1-D
// bulk copies (cp.async.bulk), all completed on the stage's mbarrier, as
// soon as the consumers have released the stage (an "empty" mbarrier a
// stage: stream_stripe_producer in stripe.cuh). No cp.async and no
// block-wide barrier is left in the main loop: the two warpgroups need not
// keep step stage by stage, and no consumer spends issue slots on copies.
// H100 kernel benchmark (session 20, ABAB x3, us, group 128): 8192x28672
// M = 32 59.4 -> 56.4, M = 64 78.4 -> 70.1, M = 128 117.4 -> 103.8;
// 28672x8192 59.2 -> 53.3, 75.8 -> 67.4, 113.9 -> 99.4. (The same bulk
// copies issued by the consumer warps themselves, with the block-wide
// barrier kept, were 13-50% slower than cp.async.)
// A type of its own rather than another TileShape parameter: every other
// tile keeps its type, so its kernel's (mangled) name and PTX stay as they
// were.
// The producer is a whole warpgroup, of which one warp works: ptxas sizes
// registers for a block's threads rounded up to warpgroups (288 threads got
// 168 registers a thread, and spills), and `setmaxnreg` moves registers
// between whole warpgroups: the producers give theirs to the consumers.
// kTrail (the dense dispatch's per-channel tiles; every wgmma tile in
// -DJAX_MARLIN_TRAIL builds and the tile sweep's "trail" rows): a stage's
// last wgmma group stays in flight into the next stage, which releases the
// stage once that group is done (compute_stage_wgmma_trailing in
// marlin_kernel.cuh).
template <typename Tile, bool kTrail>
constexpr bool can_trail() {
  // Only a trailing tile is asked about its K blocks: a tile that never
  // trails (the 2:4 kernel's) need not have them.
  if constexpr (kTrail) {
    return !Tile::kLoadsOnly && Tile::kKBlocksPerWarp % 2 == 0;
  } else {
    return true;
  }
}
template <typename Tile, bool kTrail_ = false>
struct ProducerWarp : Tile {
  static constexpr bool kProducerWarp = true;
  static constexpr bool kTrail = kTrail_;
  static_assert(can_trail<Tile, kTrail_>(),
                "trailing: two fragment sets, block 0 of a stage takes the set of its block K - 2");
  static constexpr int kBlockThreads = Tile::kThreads + 128;
  static_assert(Tile::kTmaX && Tile::kWgmma, "producer warps: kTmaX wgmma tiles only");
  static_assert(Tile::kWarpsK == 1, "the consumers' end of a tile has no K split to reduce");
};

}  // namespace jax_marlin::cuda
