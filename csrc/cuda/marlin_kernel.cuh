// The Marlin kernel: y[M, N] = x[M, K] @ dequant(packed)[K, N], a chunk of
// up to 128 rows of x a launch.
//
// Work decomposition ("striped"): the output is cut into column tiles of
// kTileN columns, the reduction into k-tiles of kTileK rows. The
// (n-tile, k-tile) iterations, k fastest, are dealt out to the blocks as
// contiguous stripes of near-equal length, at most one block per SM (on a
// layer of few n-tiles, a whole number of stripes per n-tile: stripe_count
// in launch_util.h). A stripe may end in the middle of one n-tile and
// continue into the next, so several blocks can share an n-tile: each
// stores its fp32 partial sums in its own workspace slot and counts itself
// in on the tile's counter; the last to arrive adds the slots in block
// order (fixed, so results are deterministic) and writes y.
// Nobody waits on anybody: the cost is one round trip to L2, however many
// blocks share the tile.
// Every block streams its weights through one cp.async pipeline that runs
// across n-tile boundaries, so a block never drains its loads mid-stripe.
#pragma once

#include <cuda.h>  // CUtensorMap (marlin_kernel_tma_x)
#include <cuda_runtime.h>

#include "common/marlin_layout.h"
#include "marlin_device.cuh"
#include "marlin_tiles.h"
#include "marlin_wgmma.cuh"
#include "stripe.cuh"

namespace jax_marlin::cuda {

template <typename T>
struct MarlinParams {
  const T* x;            // (rows, K) activations of this chunk
  const int4* packed;    // (K / 16, 2 N) int32 Marlin layout, as 16-byte units
  const T* scales;       // (K / group, N) permuted scales
  T* y;                  // (rows, N)
  float* workspace;      // 2 * stripes slots of kTileM * kTileN floats
  int* locks;            // N / kTileN zeroed counters (left zeroed)
  int rows, k, n;        // rows <= kTileM
  int group_shift;       // log2(group size); grouped kernels only
  int stripes;           // gridDim.x
  bool overlapped;       // launched overlapping its predecessor (launch_overlapping)
};

template <typename T, typename Tile>
class MarlinBlock {
  using T2 = typename Dtype<T>::T2;
  // 8-row blocks of x this warp multiplies: kRB of them, from row_block0_;
  // n16 sub-tiles of its slab it accumulates: kJ of them, from j0().
  static constexpr int kRB = Tile::kRowBlocksPerWarp;
  static constexpr int kJ = Tile::kSubTilesPerWarp;

 public:
  // x_map: the tensor map of x, for kTmaX tiles (marlin_kernel_tma_x).
  __device__ MarlinBlock(const MarlinParams<T>& p, int4* smem, const void* x_map = nullptr)
      : p_(p),
        x_map_(x_map),
        red_(smem + Tile::kStages * Tile::kStage),
        smem_base_(keep(smem_addr(smem))),
        warp_(threadIdx.x / 32),
        lane_(threadIdx.x % 32),
        // A warpgroup shares one slab (wgmma); otherwise each warp has one.
        warp_n_(Tile::kWgmma ? warp_ / 4 % Tile::kWarpsN : warp_ % Tile::kWarpsN),
        warp_mn_(warp_ % Tile::kWarpsMN),
        warp_k_(warp_ / Tile::kWarpsMN),
        row_block0_(warp_ / Tile::kWarpsN % Tile::kWarpsM * kRB),
        k_tiles_(p.k / Tile::kTileK),
        n_tiles_(p.n / Tile::kTileN),
        evict_first_(make_evict_first_policy()) {
    // Everything about a thread's copies and fragment reads that does not
    // change from stage to stage, worked out once: the main loop then only
    // adds a stage's base to these.
    const int tid = threadIdx.x;
    plan_x_copies<Tile>(p.rows, p.k, a_copy_coords, a_offset, a_src_, a_dst_, a_copy_, a_valid_);
    // Weights: thread tid copies unit tid % kBRow of packed row tid / kBRow,
    // then the same unit kThreads / kBRow rows further down, and so on.
    const int b_row_stride = p.n / 2;  // 2 N int32 = N / 2 int4 per packed row
    b_thread_ = p.packed + (tid / kBRow) * b_row_stride + tid % kBRow;
    // A producer warp's bulk copies take whole rows: its cursor is at the
    // tile's first unit.
    if constexpr (Tile::kProducerWarp) b_thread_ = p.packed;
    b_copy_stride_ = Tile::kThreads / kBRow * b_row_stride;
    b_k_step_ = Tile::kKBlocks * b_row_stride;
    // Scales: thread tid copies 16 bytes (8 columns) of a k-tile's scale rows.
    if constexpr (Tile::kGrouped) {
      constexpr int kRowChunks = Tile::kTileN / 8;
      s_copy_ = keep(int{tid < max(1, Tile::kTileK >> p.group_shift) * kRowChunks});
      s_src_ = keep(tid / kRowChunks * p.n + tid % kRowChunks * 8);
    }
    // With wgmma a warp reads only its own word (j0) of each 16-byte unit.
    b_read_ = keep(16 * (Tile::kAStage + (warp_k_ * Tile::kKBlocksPerWarp * Tile::kSlabs + first_slab()) * 32 +
                         lane_) +
                   4 * j0());
    s_read_ = keep(16 * (Tile::kAStage + Tile::kBStage + first_slab() * kWarpCols / 8 + lane_ / 4) + 4 * j0());
    if constexpr (kScaleOncePossible) {
      // The one group row of the warp's share of a k-tile (scale-once path).
      const int s_row = (warp_k_ * Tile::kKBlocksPerWarp * 16) >> p.group_shift;
      s_read_once_ = keep(s_read_ + s_row * (2 * Tile::kTileN));
    }
    // ldmatrix of 8 rows x 16 columns of x gives lane (g, t) x[g][2t, 2t + 1]
    // and x[g][2t + 8, 2t + 9], the B layout. Lane l addresses row l % 8 of
    // half (l / 8) % 2 of k16 block kb, chunk 2 kb + (l / 8) % 2; the swizzle
    // XORs the chunk with the row's low bits, l % 8 for every row block. The
    // XOR only touches the chunk's low 3 bits, 2 (i % 4) + (l / 8) % 2 for
    // step i of the warp (its first block is a multiple of 4 when it has 4 or
    // more): steps i and i + 4 differ by 8 chunks, so kXReads offsets cover
    // all. Where the steps stay a loop, only the row's address is kept.
    const int x_row = (row_block0_ * 8 + lane_ % 8) * XS::kRowUnits;
#pragma unroll
    for (int i = 0; i < kXReads; ++i) {
      const int kb = warp_k_ * Tile::kKBlocksPerWarp + i;
      const int chunk = kStepsUnrolled ? (kb * 2 + (lane_ / 8) % 2) ^ (lane_ % 8) : 0;
      x_read_[i] = keep(16 * (x_row + XS::chunk_units(chunk)));
    }
  }

  __device__ void run() {
    const int total = k_tiles_ * n_tiles_;
    const int begin = static_cast<int>(static_cast<long long>(blockIdx.x) * total / p_.stripes);
    const int end = static_cast<int>(static_cast<long long>(blockIdx.x + 1) * total / p_.stripes);
    const int count = end - begin;

    if constexpr (kLaunchesOverlapping<Tile::kTileM>)
      overlap_previous_grid(p_.overlapped, [&] { prefetch_prologue(begin, end); });
    // Two cursors walk the stripe: one kStages - 1 iterations ahead issuing
    // loads, one consuming. Stepped, not recomputed: no divisions per tile.
    LoadCursor load{begin / k_tiles_, begin % k_tiles_, count, nullptr};
    load.b = b_thread_ + b_tile_offset(load.n_tile, load.k_tile);
    if constexpr (Tile::kTmaX) x_bars_.init(Tile::kStages);

    zero(acc_);
    // End of this block's share of a tile: the same for every stream below.
    const auto end_tile = [&](int n_tile, uint32_t stage) {
      finish_tile(n_tile, total, stage);
      zero(acc_);
    };
    if constexpr (Tile::kProducerWarp && Tile::kTrail) {
      // The accumulators and fragments of compute_stage_wgmma_trailing,
      // which in-flight wgmmas write and read across its calls.
      float d[Tile::kSlabsPerWarpgroup][Tile::kTileM / 2];
      uint32_t afrag[Tile::kSlabsPerWarpgroup][2][4];
      zero_trailing(d);
      stream_stripe_producer<Tile::kStages, Tile::kWarps, true>(
          smem_base_, kStageBytes, count, k_tiles_, load.n_tile, load.k_tile,
          [&](uint32_t stage, bool hint) {
            load_stage_producer(stage, load, hint);
            step(load);
          },
          [&](uint32_t stage, auto&& release_previous) {
            compute_stage_wgmma_trailing(stage, d, afrag, release_previous);
          },
          end_tile, [&] { drain_trailing(d); });
      return;
    } else if constexpr (Tile::kProducerWarp) {
      stream_stripe_producer<Tile::kStages, Tile::kWarps>(
          smem_base_, kStageBytes, count, k_tiles_, load.n_tile, load.k_tile,
          [&](uint32_t stage, bool hint) {
            load_stage_producer(stage, load, hint);
            step(load);
          },
          [&](uint32_t stage) { compute_stage(stage); }, end_tile);
      return;
    }
    // x by TMA is written through the async proxy already: only cp.async'd x
    // needs the proxy fence before wgmma reads it.
    stream_stripe<Tile::kStages, Tile::kWgmma && !Tile::kTmaX>(
        smem_base_, kStageBytes, count, k_tiles_, load.n_tile, load.k_tile,
        [&](uint32_t stage, bool hint) {
          load_stage(stage, load, hint);
          step(load);
        },
        [&](uint32_t stage) { compute_stage(stage); }, end_tile);
  }

 private:
  static constexpr int kStageBytes = 16 * Tile::kStage;
  static constexpr int kBRow = Tile::kSlabs * 32;  // 16-byte units of a tile's packed row
  static constexpr int kACopies = (Tile::kAStage + Tile::kThreads - 1) / Tile::kThreads;
  static constexpr int kBCopies = (Tile::kBStage + Tile::kThreads - 1) / Tile::kThreads;
  static_assert(Tile::kBStage % Tile::kThreads == 0, "every thread copies the same weight units");
  static_assert(Tile::kThreads % kBRow == 0, "a thread copies the same unit of every kThreads / kBRow-th row");
  static_assert(!Tile::kProducerWarp || !Tile::kChannelScalesInStage,
                "a producer warp's consumers release a stage before end_tile, which must not read it");

  // Position in the (n-tile, k-tile) iteration space (k fastest) of the
  // next copies to issue, with this thread's first weight source of that
  // tile. The pointer is stepped, not rebuilt from the tile's offset: a
  // rebuilt 64-bit address costs four integer instructions a copy, which
  // was a fifth of the main loop (tile offsets in 16-byte units are < 2^31
  // for any weight that fits in memory).
  struct LoadCursor {
    int n_tile, k_tile;
    int left;  // iterations of the stripe from this one on
    const int4* b;
  };
  __device__ int b_tile_offset(int n_tile, int k_tile) const {
    return k_tile * b_k_step_ + n_tile * kBRow;
  }
  __device__ void step(LoadCursor& c) const {
    --c.left;
    if (++c.k_tile == k_tiles_) {
      c.k_tile = 0;
      ++c.n_tile;
      c.b = b_thread_ + c.n_tile * kBRow;
    } else {
      c.b += b_k_step_;
    }
  }

  // L2 prefetches of what the pipeline's prologue will copy, the weights and
  // scales of the stripe's first kStages - 1 iterations (overlap_previous_grid):
  // one packed row of a tile (kBRow 16-byte units, contiguous) a request.
  __device__ void prefetch_prologue(int begin, int end) const {
    const int tiles = min(end - begin, Tile::kStages - 1);
    for (int r = threadIdx.x; r < tiles * Tile::kKBlocks; r += Tile::kThreads) {
      const int it = begin + r / Tile::kKBlocks;
      const int n_tile = it / k_tiles_, k_tile = it - n_tile * k_tiles_;
      prefetch_l2(b_tile_start(n_tile, k_tile) + (r % Tile::kKBlocks) * (p_.n / 2), 16 * kBRow);
    }
    prefetch_scales_l2<Tile>(p_.scales, p_.n, p_.group_shift, k_tiles_, begin, end, tiles);
  }
  // The first 16-byte unit of the tile's packed rows.
  __device__ const int4* b_tile_start(int n_tile, int k_tile) const {
    return p_.packed + static_cast<size_t>(k_tile) * b_k_step_ + n_tile * kBRow;
  }

  // Activation tiles are stored with their 16-byte chunks XOR-swizzled by row
  // (chunk ^ row % 8): the 8 rows one ldmatrix phase reads then fall into 8
  // different bank groups instead of one.
  // wgmma tiles that take x by cp.async instead store it in wgmma's
  // canonical no-swizzle layout: 8-row x 16-byte core matrices, contiguous,
  // the kTileM / 8 core matrices of one 16-byte column of k next to each
  // other. (kTmaX tiles, mma.sync and wgmma: in 128-byte column-half
  // planes, SwizzledX, as the copy engine's 128-byte swizzle writes them.)
  using XS = SwizzledX<Tile::kTileM, Tile::kAChunksPerRow, Tile::kTmaX>;
  __device__ static int a_offset(int row, int chunk) {
    if constexpr (Tile::kWgmma && !Tile::kTmaX) {
      return (chunk * (Tile::kTileM / 8) + row / 8) * 8 + row % 8;
    } else {
      return XS::offset(row, chunk);
    }
  }

  // The (row, 16-byte chunk) of the x tile that copy c of a stage moves.
  // Swizzled layout: a row's chunks from consecutive threads (the XOR spreads
  // each 8-thread phase of the copy over the banks). wgmma's canonical layout
  // puts a chunk's 8 rows next to each other and a row's chunks 16 * kTileM
  // bytes apart, so in row order all 8 copies of a phase would land in one
  // bank group (8-way conflict). There consecutive threads take consecutive
  // rows of a chunk instead: a phase writes one contiguous 128-byte core
  // matrix, and a warp still reads 64 contiguous bytes of each of 8 rows.
  __device__ static void a_copy_coords(int c, int& row, int& chunk) {
    if constexpr (Tile::kWgmma) {
      const int q = c / 8;
      row = q / Tile::kAChunksPerRow * 8 + c % 8;
      chunk = q % Tile::kAChunksPerRow;
    } else {
      row = c / Tile::kAChunksPerRow;
      chunk = c % Tile::kAChunksPerRow;
    }
  }

  // The first of the kSlabsPerWarpgroup 64-column slabs this warp's
  // (warpgroup's, with wgmma) accumulators cover.
  __device__ int first_slab() const { return warp_n_ * Tile::kSlabsPerWarpgroup; }

  // The first column of this warp's n16 sub-tile j: with mma.sync sub-tile
  // j of its slab (from the slab's start), with wgmma its own sub-tile (j0)
  // of its slab j (from the n-tile's start).
  __device__ int sub_tile_col(int j) const {
    if constexpr (Tile::kWgmma) {
      return (first_slab() + j) * kWarpCols + 16 * j0();
    } else {
      return 16 * (j0() + j);
    }
  }

  // The first n16 sub-tile of the slab this warp accumulates.
  __device__ int j0() const {
    if constexpr (Tile::kWgmma) {
      return warp_ % 4;
    } else if constexpr (Tile::kWarpsJ > 1) {
      return warp_ / Tile::kWarpsN % Tile::kWarpsJ * kJ;
    } else {
      return 0;
    }
  }

  // This warp's kJ 4-byte words of a 16-byte unit (packed words or their
  // scales), from word j0 on: the whole unit, or half of it where the slab
  // is split by columns.
  __device__ static uint4 ld_words(uint32_t smem) {
    if constexpr (kJ == 4) {
      return ld_shared16(smem);
    } else {
      static_assert(kJ == 2, "mma.sync tiles take a slab's 4 sub-tiles or 2 of them");
      const uint2 v = ld_shared8(smem);
      return make_uint4(v.x, v.y, 0, 0);
    }
  }

  // Stage layout (16-byte units): x tile (kAStage), packed weight (kBStage),
  // scale rows (kSStage). `stage` is the stage's shared address.
  __device__ void load_stage(uint32_t stage, const LoadCursor& at, bool hint) {
    load_x_stage<Tile, XS>(x_bars_, x_map_, p_.x, stage, at.k_tile, a_src_, a_dst_, a_copy_, a_valid_);

    // Weights: kKBlocks rows of the packed array, kBRow 16-byte units each,
    // contiguous in global memory and copied as they are.
    const uint32_t b_dst = stage + 16 * (Tile::kAStage + threadIdx.x);
#pragma unroll
    for (int j = 0; j < kBCopies; ++j) {
      cp_async16_weights(b_dst + 16 * j * Tile::kThreads, at.b + j * b_copy_stride_, evict_first_, hint);
    }

    // Scales: the group rows this k-tile touches (one when a group spans
    // several k-tiles).
    if constexpr (Tile::kGrouped) {
      if (s_copy_) {
        // (K / group) N < 2^32 scales (16 <= group, K N / 32 < 2^31 units).
        const unsigned first_row = static_cast<unsigned>(at.k_tile * Tile::kTileK) >> p_.group_shift;
        const unsigned offset = first_row * p_.n + at.n_tile * Tile::kTileN + s_src_;
        cp_async16(stage + 16 * (Tile::kAStage + Tile::kBStage + threadIdx.x), p_.scales + offset);
      }
    }
    // Per-channel scales: the n-tile's row, in the stage that ends the
    // n-tile for this block (the epilogue reads it: channel_scale).
    if constexpr (Tile::kChannelScalesInStage) {
      if (threadIdx.x < Tile::kChannelRow && (at.k_tile == k_tiles_ - 1 || at.left == 1)) {
        cp_async16(stage + 16 * (Tile::kAStage + Tile::kBStage + threadIdx.x),
                   p_.scales + at.n_tile * Tile::kTileN + 8 * threadIdx.x);
      }
    }
  }

  // kProducerWarp: the whole stage by the copy engine, completed on the
  // stage's barrier, issued by the producer warp's lanes: lane 0 arms the
  // barrier for all of the stage's bytes and copies x's boxes, lane 1 + r
  // packed row r (kBRow units, contiguous in global memory and in the
  // stage: one 1-D bulk copy a row, evict-first where `hint`, as the
  // cp.async copies), the lanes after those the k-tile's group-scale rows
  // (kTileN halves each, contiguous likewise; as many as the group size
  // makes). A lane a copy: their operands go through uniform registers, so
  // the warp issues them one after another anyway, but no copy waits for
  // another's address arithmetic. Arming first keeps the transaction count
  // from going negative (which the barrier would allow).
  // No proxy fence before a refill: the consumers release a stage
  // (stream_stripe_producer) after their ld.shared of it have returned and
  // their wgmmas are done; a proxy fence orders one proxy's writes before
  // another's reads, and a write issued after the read completed cannot
  // change what it read (CUTLASS's TMA pipelines release the same way).
  __device__ void load_stage_producer(uint32_t stage, const LoadCursor& at, bool hint) const {
    static_assert(1 + Tile::kKBlocks + Tile::kScaleRowsMax <= 32, "a copy a lane");
    const uint32_t bar = x_bars_.of(stage);
    const int s_rows = Tile::kGrouped ? max(1, Tile::kTileK >> p_.group_shift) : 0;
    if (lane_ == 0) {
      mbarrier_arrive_expect_tx(bar, 16 * (Tile::kAStage + Tile::kBStage) + s_rows * (2 * Tile::kTileN));
      x_bars_.template copy_boxes<Tile::kTileK / Tile::kXBoxK, Tile::kXBoxK>(
          stage, bar, x_map_, at.k_tile * Tile::kTileK, [](int b) { return b * XS::kHalfUnits; });
    }
    __syncwarp();
    const int r = lane_ - 1;
    if (r >= 0 && r < Tile::kKBlocks) {
      bulk_copy_weights(stage + 16 * (Tile::kAStage + r * kBRow), at.b + r * (p_.n / 2), 16 * kBRow, bar,
                        evict_first_, hint);
    }
    if constexpr (Tile::kGrouped) {
      const int sr = lane_ - 1 - Tile::kKBlocks;
      if (sr >= 0 && sr < s_rows) {
        const unsigned first_row = static_cast<unsigned>(at.k_tile * Tile::kTileK) >> p_.group_shift;
        bulk_copy(stage + 16 * (Tile::kAStage + Tile::kBStage) + sr * (2 * Tile::kTileN),
                  p_.scales + (first_row + sr) * p_.n + at.n_tile * Tile::kTileN, 2 * Tile::kTileN, bar);
      }
    }
  }
  __device__ void compute_stage(uint32_t stage) {
    if constexpr (Tile::kLoadsOnly) {
      // A barrier's next use must find its phase complete.
      if constexpr (Tile::kTmaX) x_bars_.wait(stage);
      return;
    }
    if constexpr (Tile::kWgmma) {
      if (kScaleAccPossible && p_.group_shift >= kLog2TileK) {
        compute_stage_wgmma<kScaleAccPossible>(stage);
      } else {
        compute_stage_wgmma<false>(stage);
      }
    } else {
      if constexpr (Tile::kTmaX) x_bars_.wait(stage);
      if constexpr (kScaleOncePossible) {
        if (p_.group_shift >= kLog2WarpK) {
          compute_stage_scaled_once(stage);
        } else {
          multiply_stage<true>(stage, acc_);
        }
      } else {
        multiply_stage<Tile::kGrouped>(stage, acc_);
      }
    }
  }

  // Group scales applied in fp32, once per k-tile, where this warp's share
  // of the k-tile (16 * kKBlocksPerWarp rows) lies in one group: the MMAs
  // take the unscaled codes (exact in 16 bits) into fresh accumulators, which
  // saves the four half2 multiplies each packed word costs otherwise. The
  // fresh accumulators double the warp's; with up to 2 row blocks they fit.
  static constexpr bool kScaleOncePossible = Tile::kGrouped && !Tile::kWgmma && Tile::kWarpsJ == 1 && kRB <= 2;
  static constexpr int kLog2WarpK = log2_exact(16 * Tile::kKBlocksPerWarp);

  __device__ void compute_stage_scaled_once(uint32_t stage) {
    Accumulators<kRB, kJ> part;
    zero(part);
    multiply_stage<false>(stage, part);
    const uint4 s_raw = ld_shared16(stage + s_read_once_);
    const uint32_t scale_words[4] = {s_raw.x, s_raw.y, s_raw.z, s_raw.w};
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      // Low half: column 16 j + g (accumulator elements 0, 1); high: + 8.
      const float2 s = Dtype<T>::to_floats(as_t2<T2>(scale_words[j]));
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) {
        acc_[rb][j][0] += part[rb][j][0] * s.x;
        acc_[rb][j][1] += part[rb][j][1] * s.x;
        acc_[rb][j][2] += part[rb][j][2] * s.y;
        acc_[rb][j][3] += part[rb][j][3] * s.y;
      }
    }
  }

  // One k16 step's operands, as this lane reads them from shared memory.
  struct StepOperands {
    uint4 words;         // packed words of the warp's kJ n16 tiles (ld_words)
    uint4 scales;        // their group scales (scaled steps only)
    uint32_t x[kRB][2];  // x^T B fragments (k16 x n8), one per row block
  };

  // Issues the shared-memory reads of k16 step i of this warp's share of the stage.
  template <bool kScaled>
  __device__ void load_step(uint32_t stage, int i, StepOperands& op) const {
    const int kb = warp_k_ * Tile::kKBlocksPerWarp + i;
    op.words = ld_words(stage + b_read_ + 16 * 32 * Tile::kSlabs * i);
    // Group scales: the scale permutation puts the 8 columns a lane's
    // words touch (c, c + 8, ..., c + 56 with c = lane / 4) in 16 bytes.
    op.scales = make_uint4(0, 0, 0, 0);
    if constexpr (kScaled) {
      const int s_row = (kb * 16) >> p_.group_shift;
      op.scales = ld_words(stage + s_read_ + s_row * (2 * Tile::kTileN));
    }
    // x fragments (the constructor has this lane's swizzled addresses).
    uint32_t x_step;
    if constexpr (kStepsUnrolled) {
      x_step = stage + x_read_[i % kXReads] + 16 * XS::kHalfUnits * (i / kXReads);
    } else {
      x_step = stage + x_read_[0] + 16 * XS::chunk_units((kb * 2 + (lane_ / 8) % 2) ^ (lane_ % 8));
    }
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb) {
      ldmatrix_x2(op.x[rb], x_step + 16 * rb * 8 * XS::kRowUnits);
    }
  }

  // Dequantizes one step's words (scaled: times their group scales) and
  // multiplies them by every row block's x fragment, into `acc`.
  template <bool kScaled>
  __device__ void multiply_step(const StepOperands& op, float (&acc)[kRB][kJ][4]) const {
    const uint32_t words[4] = {op.words.x, op.words.y, op.words.z, op.words.w};
    const uint32_t scale_words[4] = {op.scales.x, op.scales.y, op.scales.z, op.scales.w};
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      // The word holds the B fragments of columns 16 j + g (b0) and
      // 16 j + 8 + g (b1); the same eight values, reordered, are the A
      // fragment of the 16 x 16 tile W^T[16 j .. 16 j + 15][k16].
      uint32_t b0[2], b1[2];
      Dtype<T>::dequant(words[j], b0, b1);
      if constexpr (kScaled) {
        const T2 s = as_t2<T2>(scale_words[j]);
        scale_fragment<T>(b0, Dtype<T>::lo_pair(s));
        scale_fragment<T>(b1, Dtype<T>::hi_pair(s));
      }
      const uint32_t wfrag[4] = {b0[0], b1[0], b0[1], b1[1]};
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) MmaOp<T>::run(wfrag, op.x[rb], acc[rb][j]);
    }
  }

  // This warp's k16 blocks of the stage, mma.sync, into `acc`; kScaled: the
  // dequantized weights are multiplied by their group scales first. With 4
  // row blocks the accumulators fill most of the register file: the step
  // pairs stay a loop there.
  static constexpr bool kStepsUnrolled = kRB <= 2;
  // Loop invariants kept in registers where there is room (keep_if_room).
  template <typename V>
  __device__ static V keep(V v) {
    return keep_if_room<kRB>(v);
  }
  template <bool kScaled>
  __device__ void multiply_stage(uint32_t stage, float (&acc)[kRB][kJ][4]) {
    pipelined_steps<Tile::kKBlocksPerWarp, !kStepsUnrolled, (kRB <= 4), StepOperands>(
        [&](int i, StepOperands& op) { load_step<kScaled>(stage, i, op); },
        [&](const StepOperands& op) { multiply_step<kScaled>(op, acc); });
  }

  // The wgmma tiles' A fragments of this warp's k16 block i of `stage`, of
  // every slab of its warpgroup, into frag(slab) (4 registers each);
  // kScaled: times their group scales.
  template <bool kScaled = Tile::kGrouped, typename Frag>
  __device__ void dequantize_block(uint32_t stage, int i, Frag&& frag) const {
    const int kb = warp_k_ * Tile::kKBlocksPerWarp + i;
#pragma unroll
    for (int slab = 0; slab < Tile::kSlabsPerWarpgroup; ++slab) {
      const uint32_t word = ld_shared4(stage + b_read_ + 16 * 32 * (Tile::kSlabs * i + slab));
      uint32_t b0[2], b1[2];
      Dtype<T>::dequant(word, b0, b1);
      if constexpr (kScaled) {
        const T2 s = group_scale_pair(stage, (kb * 16) >> p_.group_shift, slab);
        scale_fragment<T>(b0, Dtype<T>::lo_pair(s));
        scale_fragment<T>(b1, Dtype<T>::hi_pair(s));
      }
      uint32_t(&a)[4] = frag(slab);
      a[0] = b0[0], a[1] = b1[0], a[2] = b0[1], a[3] = b1[1];
    }
  }

  // Group scales on the wgmma tiles' accumulators (kScaleAcc), where one
  // group spans the whole k-tile (group_shift >= log2 kTileK, e.g. group 128
  // on a 128-deep tile): the stage's wgmmas take the unscaled codes (exact in
  // 16 bits) into fresh accumulators, and each thread then adds them, times
  // the scales of its two weight columns a slab, into acc_ in fp32: an FFMA
  // an accumulator a stage instead of an HMUL2 a half2 of every fragment and
  // a scale read a k16 block, which sit between the dequantize and its
  // wgmma. It needs a second set of accumulators in registers, and the
  // FFMAs, which grow with the rows, come after the stage's wgmma wait,
  // where nothing overlaps them: it pays up to 32 rows (16 accumulators a
  // slab). H100 kernel benchmark (session 24, three ABAB x3 runs, group
  // 128): M = 32 2-5% faster on the 4096- and 8192-row layers (8192^2 21.9
  // -> 21.0 us), 0-2.5% on 8192x28672 and 28672x8192; the 64-row tile was
  // up to 3% slower that way (28672x8192 66.8 -> 68.6 us).
  static constexpr bool kScaleAccPossible = Tile::kWgmma && Tile::kGrouped && Tile::kTileM <= 32;
  static constexpr int kLog2TileK = log2_exact(Tile::kTileK);

  // The group scales of this thread's two weight columns (rows 16 w + g and
  // 16 w + g + 8) of its warpgroup's slab `slab`, in the stage's group row
  // s_row.
  __device__ T2 group_scale_pair(uint32_t stage, int s_row, int slab) const {
    return as_t2<T2>(ld_shared4(stage + s_read_ + s_row * (2 * Tile::kTileN) + slab * (2 * kWarpCols)));
  }

  // wgmma: this warp dequantizes its word of every k16 block's packed unit
  // (16 of a slab's 64 columns), in each of its warpgroup's slabs, into a
  // register A fragment; then the warpgroup multiplies each with the k16 x
  // kTileM slice of x^T (one x operand for all its slabs). The stage
  // is not refilled before the next iteration's barrier, so waiting for the
  // group here keeps its x tile alive long enough.
  //
  // x by TMA (kTmaX): the dequantize (CUDA cores) and the wgmmas (tensor
  // cores) overlap within the stage: k16 block i's wgmmas are issued as soon
  // as its A fragments are dequantized, and block i + 1 is dequantized while
  // they run (every block has its own fragment registers, which ptxas keeps
  // untouched until the wait; the accumulators chain from wgmma to wgmma of
  // the same shape, which needs no fence). Only block 0's dequantize waits
  // for nothing and only the last block's wgmmas for everything: the rest
  // runs side by side. The stage's one wait for all of it stays at the end,
  // so no group is in flight across the next iteration's barrier and the
  // stage ring (stream_stripe) needs no "x consumed" barrier or extra stage
  // of slack, and the accumulators never leave this function while a group
  // is in flight. (Overlapping across stages instead would need a second
  // set of kS * kKBlocksPerWarp * 4 fragment registers, as the next stage's
  // dequantize would write while the previous group still reads them.)
  // The cp.async wgmma tiles (tile sweep only) keep the old order.
  //
  // Wide tiles (kRing: accumulators and a fragment set a block would take
  // more than half of a thread's 255 registers, e.g. four slabs a
  // warpgroup) keep two fragment sets instead, a commit group a block:
  // block i + 1 is dequantized into the set block i - 1 read, once
  // wgmma_wait<1> has seen that group done. Same wgmmas in the same order,
  // so the same bits, in fewer registers (the 128x512 tile at 32 rows: 200
  // instead of 236; ptxas serialized the wgmmas of the 64-row one).
  template <bool kScaleAcc>
  __device__ void compute_stage_wgmma(uint32_t stage) {
    constexpr int kS = Tile::kSlabsPerWarpgroup;
    constexpr bool kOverlap = Tile::kTmaX;
    constexpr bool kRing = kOverlap && kS * (Tile::kTileM / 2 + 4 * Tile::kKBlocksPerWarp) > 128;
    constexpr int kSets = kRing ? 2 : Tile::kKBlocksPerWarp;
    // kProducerWarp: the weights come on x's barrier, so the wait goes
    // before the first dequantize. (A barrier of their own would let that
    // dequantize run while x still lands; but x comes from L2 and is issued
    // first, the weights from HBM: it is the weights the wait waits for.)
    if constexpr (Tile::kProducerWarp) x_bars_.wait(stage);
    uint32_t afrag[kS][kSets][4];
    auto dequantize = [&](int i) {
      dequantize_block<Tile::kGrouped && !kScaleAcc>(stage, i,
                                                     [&](int slab) -> uint32_t(&)[4] { return afrag[slab][i % kSets]; });
    };
    if constexpr (kOverlap) {
      dequantize(0);
    } else {
#pragma unroll
      for (int i = 0; i < Tile::kKBlocksPerWarp; ++i) dequantize(i);
    }
    // B = x^T, K-major. By cp.async (no swizzle): the two 16-byte columns of
    // k of block kb are kTileM / 8 core matrices apart (leading offset);
    // 8-row groups are adjacent (stride offset). By TMA: 128-byte swizzle.
    constexpr uint32_t kKStep = 16 * 8 * (Tile::kTileM / 8), kNStep = 128;
    // x by TMA: wait only now, after the (first) dequantize, which needs no x.
    if constexpr (Tile::kTmaX && !Tile::kProducerWarp) x_bars_.wait(stage);
    float d[kS][Tile::kTileM / 2];
    if constexpr (!kScaleAcc) accumulators_to_wgmma(acc_, d);
    if constexpr (!kOverlap) wgmma_fence();
#pragma unroll
    for (int i = 0; i < Tile::kKBlocksPerWarp; ++i) {
      const int kb = warp_k_ * Tile::kKBlocksPerWarp + i;
      uint64_t desc;
      if constexpr (Tile::kTmaX) {
        // The k16 block's 32 bytes in its 128-byte half's plane.
        desc = wgmma_descriptor_sw128(stage + 16 * (kb / 4 * XS::kHalfUnits) + 32 * (kb % 4));
      } else {
        const uint32_t start = stage + 2 * kb * kKStep;
        desc = kWgmmaLeadingIsK ? wgmma_descriptor(start, kKStep, kNStep)
                                : wgmma_descriptor(start, kNStep, kKStep);
      }
      // Block i's fragments were written after the last fence: fence them
      // (wgmma.fence orders this thread's register writes before the
      // wgmmas that read them; it is no wait for the wgmmas in flight, and
      // ptxas keeps blocks < i's fragments and the accumulators untouched
      // until the wait below: SASS has one WARPGROUP.ARRIVE a block and a
      // single WARPGROUP.DEPBAR, no serialization warning).
      if constexpr (kOverlap) wgmma_fence();
#pragma unroll
      for (int slab = 0; slab < kS; ++slab) {
        if (kScaleAcc && i == 0) {
          WgmmaRS<T, Tile::kTileM>::run_fresh(d[slab], afrag[slab][i % kSets], desc);
        } else {
          WgmmaRS<T, Tile::kTileM>::run(d[slab], afrag[slab][i % kSets], desc);
        }
      }
      if constexpr (kRing) wgmma_commit();
      if constexpr (kOverlap) {
        if (i + 1 < Tile::kKBlocksPerWarp) {
          if constexpr (kRing) wgmma_wait<1>();  // block i - 1's group: its set is block i + 1's
          dequantize(i + 1);
        }
      }
    }
    if constexpr (!kRing) wgmma_commit();
    if constexpr (kScaleAcc) {
      // The stage's one group row, read before the wait: its latency hides
      // behind the last wgmmas.
      float2 s[kS];
#pragma unroll
      for (int slab = 0; slab < kS; ++slab) s[slab] = Dtype<T>::to_floats(group_scale_pair(stage, 0, slab));
      wgmma_wait<0>();
      wgmma_scaled_into_accumulators(d, s, acc_);
    } else {
      wgmma_wait<0>();
      wgmma_to_accumulators(d, acc_);
    }
  }

  // kTrail (the per-channel tiles): compute_stage_wgmma's overlapped form with two
  // fragment sets and a commit group a block (as kRing), but the stage's
  // last group stays in flight past its end, into the next stage's barrier
  // wait and first dequantize, which otherwise wait for the tensor pipe to
  // drain every stage. Block 0 of a stage takes set 0, which the previous
  // stage's block K - 2 read (wgmma_wait<1> before its dequantize); the
  // previous stage is released (release_previous) once block 0's commit
  // leaves only one group pending, i.e. the previous stage's last is done.
  // The accumulators (d) and fragments (afrag) are run()'s, not the
  // call's, as in-flight wgmmas write and read them across calls; they are
  // copied into acc_ only by drain_trailing, at the end of the block's
  // share of a tile.
  static constexpr int kTrailSlabs = Tile::kSlabsPerWarpgroup;
  using TrailAccumulators = float[kTrailSlabs][Tile::kTileM / 2];
  using TrailFragments = uint32_t[kTrailSlabs][2][4];
  __device__ static void zero_trailing(TrailAccumulators& d) {
#pragma unroll
    for (int slab = 0; slab < kTrailSlabs; ++slab)
#pragma unroll
      for (int r = 0; r < Tile::kTileM / 2; ++r) d[slab][r] = 0.f;
  }
  // Every group done: the accumulators into acc_ (for end_tile), and d
  // from 0 again.
  __device__ void drain_trailing(TrailAccumulators& d) {
    wgmma_wait<0>();
    wgmma_to_accumulators(d, acc_);
    zero_trailing(d);
  }
  template <typename Release>
  __device__ void compute_stage_wgmma_trailing(uint32_t stage, TrailAccumulators& d, TrailFragments& afrag,
                                               Release&& release_previous) {
    constexpr int kS = Tile::kSlabsPerWarpgroup, kK = Tile::kKBlocksPerWarp;
    auto dequantize = [&](int i) {
      dequantize_block(stage, i, [&](int slab) -> uint32_t(&)[4] { return afrag[slab][i % 2]; });
    };
    x_bars_.wait(stage);
    wgmma_wait<1>();  // the previous stage's block K - 2: set 0 is free
    dequantize(0);
#pragma unroll
    for (int i = 0; i < kK; ++i) {
      const int kb = warp_k_ * kK + i;
      const uint64_t desc = wgmma_descriptor_sw128(stage + 16 * (kb / 4 * XS::kHalfUnits) + 32 * (kb % 4));
      wgmma_fence();
#pragma unroll
      for (int slab = 0; slab < kS; ++slab) WgmmaRS<T, Tile::kTileM>::run(d[slab], afrag[slab][i % 2], desc);
      wgmma_commit();
      if (i + 1 < kK) {
        wgmma_wait<1>();  // block i - 1's group (i = 0: the previous stage's last)
        if (i == 0) release_previous();
        dequantize(i + 1);
      }
    }
  }

  // End of this block's share of n-tile `n_tile` (stripe.cuh);
  // whoever completes the tile writes the output.
  __device__ void finish_tile(int n_tile, int total, uint32_t stage) {
    const TileReduction<Tile, kRB, kJ> reduction{reinterpret_cast<float4*>(red_), p_.workspace,
                                                 p_.locks, p_.stripes, k_tiles_, warp_k_, warp_mn_,
                                                 lane_};
    if (reduction.finish(acc_, n_tile, total, [this](int rb, int j) { return workspace_index(rb, j); }))
      write_output(n_tile, stage);
  }

  __device__ int workspace_index(int rb, int j) const {
    if constexpr (Tile::kWgmma) {
      return (((row_block0_ + rb) * 4 + j0()) * Tile::kSlabs + first_slab() + j) * 32 + lane_;
    } else {
      return (((row_block0_ + rb) * 4 + j0() + j) * Tile::kWarpsN + warp_n_) * 32 + lane_;
    }
  }

  // Accumulator layout (m16n8, here n16 x m8): lane (g, t) holds columns
  // 16 j + g (elements 0, 1) and 16 j + g + 8 (elements 2, 3), each for rows
  // 2 t and 2 t + 1 of the row block. `stage`: the stage that ended the tile.
  __device__ void write_output(int n_tile, uint32_t stage) {
    const int col0 = n_tile * Tile::kTileN + (Tile::kWgmma ? 0 : warp_n_ * kWarpCols);
    const int g = lane_ / 4, t = lane_ % 4;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = col0 + sub_tile_col(j) + 8 * half + g;
        float s = 1.f;
        if constexpr (Tile::kChannelScalesInStage) {
          s = channel_scale(stage, n_tile, col);
        } else if constexpr (!Tile::kGrouped) {
          s = to_float(p_.scales[MarlinPerChannelScalePosition(col)]);
        }
#pragma unroll
        for (int rb = 0; rb < kRB; ++rb) {
          const int row = (row_block0_ + rb) * 8 + 2 * t;
          T* out = p_.y + static_cast<size_t>(row) * p_.n + col;
          if (row < p_.rows) out[0] = from_float(acc_[rb][j][2 * half] * s);
          if (row + 1 < p_.rows) out[p_.n] = from_float(acc_[rb][j][2 * half + 1] * s);
        }
      }
    }
  }

  // The per-channel scale of column `col` of n-tile `n_tile`, from the scale
  // row `stage` carries (load_stage).
  __device__ float channel_scale(uint32_t stage, int n_tile, int col) const {
    const int pos = MarlinPerChannelScalePosition(col) - n_tile * Tile::kTileN;
    const uint32_t word = ld_shared4(stage + 16 * (Tile::kAStage + Tile::kBStage) + 4 * (pos / 2));
    const uint32_t bits = pos % 2 ? word >> 16 : word & 0xffffu;
    return Dtype<T>::to_floats(as_t2<T2>(bits | bits << 16)).x;
  }
  __device__ static float to_float(T v) { return Dtype<T>::to_floats(T2(v, v)).x; }
  __device__ static T from_float(float v) { return Dtype<T>::from_floats(v, v).x; }

  const MarlinParams<T> p_;
  const void* x_map_;
  int4* red_;
  const uint32_t smem_base_;  // shared address of stage 0
  // kTmaX: the stages' x barriers, after the reduction scratch.
  TmaXBarriers<kStageBytes> x_bars_{smem_base_ + 16 * (Tile::kStages * Tile::kStage + Tile::kRed), smem_base_};
  const int warp_, lane_, warp_n_, warp_mn_, warp_k_, row_block0_;
  const int k_tiles_, n_tiles_;
  const uint64_t evict_first_;
  // This thread's copies: source offsets (16-byte units, from the k-tile's
  // start in x / from the tile's start in the packed weight), destination
  // offsets in a stage (bytes), and for x whether the copy exists and whether
  // its row is real (else zero-filled).
  int a_src_[kACopies], a_dst_[kACopies];
  bool a_copy_[kACopies], a_valid_[kACopies];
  const int4* b_thread_;  // this thread's first weight source in tile (0, 0)
  int b_copy_stride_;     // 16-byte units between its copies of a tile
  int b_k_step_;          // 16-byte units from a tile to the next along k
  // Grouped scales: whether this thread copies 16 bytes of a k-tile's scale
  // rows, and from where (elements past the rows' start at the n-tile).
  int s_copy_ = 0;
  int s_src_ = 0;
  // Byte offsets in a stage of this lane's first weight, scale and x reads.
  // x_read_[i]: the ldmatrix address of the warp's k16 step i (i < 4), or
  // of the row (steps in a loop).
  static constexpr int kXReads = !kStepsUnrolled ? 1 : Tile::kKBlocksPerWarp < 4 ? Tile::kKBlocksPerWarp : 4;
  static_assert(Tile::kKBlocksPerWarp <= 4 || Tile::kKBlocksPerWarp % 4 == 0, "see x_read_");
  int b_read_, s_read_, x_read_[kXReads];
  int s_read_once_ = 0;  // compute_stage_scaled_once's scale row
  // acc_[rb][j]: the m16n8 accumulator of output columns 16 j .. 16 j + 15 of
  // the warp's slab (as MMA rows) and rows 8 rb .. 8 rb + 7 of x (as columns).
  float acc_[kRB][kJ][4];
};

template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::kBlockThreads, Tile::kBlocksPerSM)
    marlin_kernel(const MarlinParams<T> p) {
  static_assert(Tile::kFits, "the tile's pipeline stages do not fit in shared memory");
  phase(kEntry);
  extern __shared__ int4 smem[];
  MarlinBlock<T, Tile> block(p, smem);
  block.run();
}

// The kTmaX tiles' kernel (compute capability 9.0+; x_by_tma picks it): as
// marlin_kernel, with a tensor map of this chunk's x, (rows, K) row-major
// (encode_x_tensor_map). __grid_constant__: TMA reads the map where the
// parameter lives. Below sm_90 the body is left out (it is never launched
// there), which also spares that compilation.
template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::kBlockThreads, Tile::kBlocksPerSM)
    marlin_kernel_tma_x(const MarlinParams<T> p, const __grid_constant__ CUtensorMap x_map) {
  static_assert(Tile::kFits && Tile::kTmaX, "a kTmaX tile whose stages fit");
#if JAX_MARLIN_HAS_TMA
  if constexpr (Tile::kWgmma && !JAX_MARLIN_HAS_WGMMA) {
    __trap();  // sm_90 code without wgmma: never launched (wgmma_launches)
  } else {
    phase(kEntry);
    extern __shared__ int4 smem[];
    // The 128-byte swizzle repeats every 1024 bytes: stages start there.
    MarlinBlock<T, Tile> block(p, align_shared<1024>(smem), &x_map);
    block.run();
  }
#else
  __trap();
#endif
}

}  // namespace jax_marlin::cuda
