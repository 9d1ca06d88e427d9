// The 2:4 sparse Marlin kernel (issue 8): y[M, N] = x[M, K] @ W[K, N] for
// a chunk of up to 128 rows of x, W stored in the sparse layout of docs/SPARSE_FORMAT.md.
//
// Same structure as MarlinBlock (marlin_kernel.cuh): y^T = W^T x^T with the
// dequantized weight as the (sparse) A operand, striped (n-tile, k-tile)
// iterations over at most one block per SM (stripe_count), a cp.async
// multi-stage pipeline running across n-tile boundaries with evict-first
// weight streams, an in-block K split reduced through shared memory, and the
// last-arriver reduction of shared n-tiles through the workspace (counters
// left zeroed).
//
// What differs: the weight's unit of K is a *band* of 32 rows (one
// mma.sp.m16n8k32), and a band of a 64-column run is 512 bytes of values
// (the same bytes a 16-row dense band takes) plus 256 bytes of metadata. Per
// byte of weight a k-tile therefore covers twice the K of a dense one, and
// the tensor cores do half the instructions per k (mma.sp consumes k32).
// Per band a lane does one 16-byte values load (its A fragments for the
// warp's four n16 blocks), one 8-byte metadata load (the metadata registers
// of the two mma pairs), and one ldmatrix.x4 per 8-row block of x.
#pragma once

#include <cuda_runtime.h>

#include "marlin_device.cuh"
#include "marlin_kernel.cuh"  // Dtype, MmaOp helpers, smem_addr
#include "stripe.cuh"
#include "marlin_tiles.h"

namespace jax_marlin::cuda {

// ---------------------------------------------------------------------------
// Tile geometry
// ---------------------------------------------------------------------------

// kRowBlocks: 8-row blocks of x (1, 2, 4, 8, 16); kNBlocks: 16-column blocks of
// the output per tile (a multiple of 4: a warp owns a 64-column run);
// kBands: 32-row bands of K per tile; kWarps: warps per block; kWarpsM:
// warps sharing a run, each with kRowBlocks / kWarpsM row blocks. Warps not
// needed to tile M and N split the k-tile's bands. kTmaX (compute
// capability 9.0+, x_by_tma): x comes by TMA, in 128-byte swizzled halves, as the dense kernel's
// kTmaX mma.sync tiles (marlin_tiles.h; sparse_kernel_tma_x).
// kWgmma (sm_90a, kTmaX tiles only; dispatched at 32-128 rows where
// wgmma_launches()): as the
// dense kWgmma tile, a warpgroup multiplies a 64-column run (or several) by
// all kTileM rows, one wgmma.mma_async.sp m64n{kTileM}k32 a band and run;
// warp w of the warpgroup supplies the run's n-block w (word w of each
// lane's 16-byte values unit, dequantized into the register A fragment) and
// its metadata register; x^T is read through 128-byte-swizzle descriptors.
template <int kRowBlocks_, int kNBlocks_, int kBands_, int kWarps_, bool kGrouped_, int kWarpsM_ = 1,
          bool kTmaX_ = false, bool kWgmma_ = false>
struct SparseTileShape {
  static constexpr int kRowBlocks = kRowBlocks_, kNBlocks = kNBlocks_, kBands = kBands_;
  static constexpr int kWarps = kWarps_;
  static constexpr bool kGrouped = kGrouped_;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr bool kTmaX = kTmaX_;
  static constexpr bool kWgmma = kWgmma_;
  static constexpr int kXBoxK = 64;  // kTmaX: columns of x a TMA box spans
  static constexpr int kBlocksPerSM = 1;
  static constexpr int kRowBlocksPerWarp = kRowBlocks / kWarpsM;

  static constexpr int kThreads = kWarps * 32;
  // Threads a block is launched with; ProducerWarp<...> (marlin_tiles.h)
  // adds its producer warpgroup.
  static constexpr int kBlockThreads = kThreads;
  static constexpr bool kProducerWarp = false;
  static constexpr int kTileM = 8 * kRowBlocks, kTileN = 16 * kNBlocks, kTileK = 32 * kBands;
  // 64-column runs of the tile (the layout's unit along N). With mma.sp a
  // warp takes (a share of) one run; with wgmma a warpgroup takes
  // kRunsPerWarpgroup of them (more where the tile has more runs than the
  // block has warpgroups, as the dense kSlabsPerWarpgroup), each of its
  // warps one n-block (kSubTilesPerWarp accumulator sets: one a run).
  static constexpr int kRuns = kTileN / kWarpCols;
  static constexpr int kRunsPerWarpgroup = kWgmma && kRuns > kWarps / 4 ? kRuns / (kWarps / 4) : 1;
  static constexpr int kSubTilesPerWarp = kWgmma ? kRunsPerWarpgroup : 4;
  // Warps (warpgroups with wgmma) along N.
  static constexpr int kWarpsN = kRuns / kRunsPerWarpgroup;
  static constexpr int kWarpsMN = kWarpsM * kWarpsN * (kWgmma ? 4 : 1);
  static constexpr int kWarpsK = kWarps / kWarpsMN;
  static constexpr int kBandsPerWarp = kBands / kWarpsK;

  // Shared memory per pipeline stage, in 16-byte units: x tile, values
  // (32 units a band and run), metadata (16 units a band and run), scale rows
  // (one per group of 32 at most, i.e. one per band).
  static constexpr int kAChunksPerRow = kTileK / 8;
  static constexpr int kAStage = kTileM * kAChunksPerRow;
  static constexpr int kVRow = kRuns * 32;  // values units of one band of the tile
  static constexpr int kMRow = kRuns * 16;  // metadata units of one band of the tile
  static constexpr int kVStage = kBands * kVRow;
  static constexpr int kMStage = kBands * kMRow;
  static constexpr int kSStage = kGrouped ? kBands * kTileN / 8 : 0;
  static constexpr int kStage = tma_x_stage(kTmaX, kAStage + kVStage + kMStage + kSStage);
  static constexpr int kRed = (kWarpsK / 2) * kWarpsMN * kRowBlocksPerWarp * kSubTilesPerWarp * 32;
  static constexpr int kBarrierUnits = tma_x_units(kTmaX, 1024);
  static constexpr int kBlockBudget = kSmemBudget / 16 - kBarrierUnits;
  static constexpr int kStages = (kBlockBudget - kRed) / kStage < kMaxStages
                                     ? (kBlockBudget - kRed) / kStage
                                     : kMaxStages;
  static constexpr int kSmemBytes = 16 * (kStages * kStage + kRed + kBarrierUnits);
  static constexpr bool kFits = kStages >= 3;

  static_assert(kNBlocks % 4 == 0, "a warp owns 64 output columns");
  static_assert(kRowBlocks % kWarpsM == 0, "the M split must divide the row blocks");
  static_assert(kWarps % kWarpsMN == 0 && kWarpsK >= 1, "warps must tile M and N evenly");
  static_assert(kBands % kWarpsK == 0, "the K split must divide the k-tile's bands");
  static_assert((kWarpsK & (kWarpsK - 1)) == 0, "tree reduction needs a power-of-two K split");
  static_assert(!kTmaX || kTileK % kXBoxK == 0, "x by TMA: whole 64-column halves");
  static_assert(kAChunksPerRow >= 8, "the x swizzle permutes groups of 8 chunks");
  static_assert(kVStage % kThreads == 0, "every thread copies the same number of value units");
  static_assert(kRuns % kRunsPerWarpgroup == 0, "warpgroups must share the runs evenly");
  static_assert(!kWgmma || (kTmaX && kWarpsM == 1 && kWarps % 4 == 0 &&
                            (kTileM == 8 || kTileM == 16 || kTileM == 32 || kTileM == 64 || kTileM == 128)),
                "wgmma tiles: x by TMA, whole warpgroups, no M split, 8 to 128 rows");
};

// ---------------------------------------------------------------------------
// Device pieces only the sparse kernel uses
// ---------------------------------------------------------------------------

// Four 8x8 b16 matrices: lanes 8q .. 8q + 7 point at the rows of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&frag)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(frag[0]), "=r"(frag[1]), "=r"(frag[2]), "=r"(frag[3])
               : "r"(smem));
}

// mma.sp m16n8k32, f32 accumulation. A: the 16 x 32 sparse W^T block as its
// 16 x 16 kept values (4 registers), B: 32 k x 8 rows of x (4 registers),
// e: the metadata register, kSelector: which thread pair of each group of
// four supplies it (0: lanes t = 0, 1; 1: t = 2, 3; PTX ISA, "Sparse matrix
// storage"). ::ordered_metadata: our positions are always two distinct,
// increasing indices, which that variant requires and sm_90 prefers.
template <typename T>
struct SparseMmaOp;

template <>
struct SparseMmaOp<half> {
  template <int kSelector>
  static __device__ __forceinline__ void run(const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e, float (&c)[4]) {
    asm(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e), "n"(kSelector));
  }
};

template <>
struct SparseMmaOp<__nv_bfloat16> {
  template <int kSelector>
  static __device__ __forceinline__ void run(const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e, float (&c)[4]) {
    asm(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
          "r"(e), "n"(kSelector));
  }
};

// ---------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------

template <typename T>
struct SparseParams {
  const T* x;            // (rows, K) activations of this chunk
  const int4* values;    // (K / 32, 2 N) int32 kept codes, as 16-byte units
  const int4* meta;      // (K / 32, N) int32 positions, as 16-byte units
  const T* scales;       // (K / group, N) scales, grouped order for every group size
  T* y;                  // (rows, N)
  float* workspace;      // 2 * stripes slots of kTileM * kTileN floats
  int* locks;            // N / 64 zeroed counters (left zeroed)
  int rows, k, n;        // rows <= kTileM
  int group_shift;       // log2(group size); grouped kernels only
  int stripes;           // gridDim.x
  bool overlapped;       // launched overlapping its predecessor (launch_overlapping)
};

template <typename T, typename Tile>
class SparseBlock {
  using T2 = typename Dtype<T>::T2;
  static constexpr int kRB = Tile::kRowBlocksPerWarp;
  // n16 accumulator sets a warp holds: the 4 n-blocks of its run (mma.sp),
  // or its own n-block (j0) of each of its warpgroup's runs (wgmma).
  static constexpr int kJ = Tile::kSubTilesPerWarp;
  // Up to 2 row blocks a warp the bands are unrolled; beyond, pairs of them
  // stay a loop (the accumulators fill the register file).
  static constexpr bool kBandsUnrolled = kRB <= 2;
  // Loop invariants kept in registers where there is room (keep_if_room).
  template <typename V>
  __device__ static V keep(V v) {
    return keep_if_room<kRB>(v);
  }

 public:
  // x_map: the tensor map of x, for kTmaX tiles (sparse_kernel_tma_x).
  __device__ SparseBlock(const SparseParams<T>& p, int4* smem, const void* x_map = nullptr)
      : p_(p),
        x_map_(x_map),
        red_(smem + Tile::kStages * Tile::kStage),
        smem_base_(keep(smem_addr(smem))),
        warp_(threadIdx.x / 32),
        lane_(threadIdx.x % 32),
        // A warpgroup shares its runs (wgmma); otherwise each warp has one.
        warp_n_(Tile::kWgmma ? warp_ / 4 % Tile::kWarpsN : warp_ % Tile::kWarpsN),
        warp_mn_(warp_ % Tile::kWarpsMN),
        warp_k_(warp_ / Tile::kWarpsMN),
        row_block0_(warp_ / Tile::kWarpsN % Tile::kWarpsM * kRB),
        k_tiles_(p.k / Tile::kTileK),
        n_tiles_(p.n / Tile::kTileN),
        evict_first_(make_evict_first_policy()) {
    const int tid = threadIdx.x;
    // A row's chunks from consecutive threads (the swizzle spreads each
    // 8-thread phase of the copy over the banks).
    const auto coords = [](int c, int& row, int& chunk) {
      row = c / Tile::kAChunksPerRow;
      chunk = c % Tile::kAChunksPerRow;
    };
    plan_x_copies<Tile>(p.rows, p.k, coords, a_offset, a_src_, a_dst_, a_copy_, a_valid_);
    // Values and metadata: thread tid copies unit tid % kVRow (kMRow) of
    // band tid / kVRow (kMRow), then the same unit kThreads / kVRow
    // (kThreads / kMRow) bands further, and so on.
    const int v_row_stride = p.n / 2;  // 2 N int32 = N / 2 units per band
    v_thread_ = p.values + (tid / Tile::kVRow) * v_row_stride + tid % Tile::kVRow;
    // A producer warp's bulk copies take whole band rows: its cursors are at
    // the tile's first units.
    if constexpr (Tile::kProducerWarp) v_thread_ = p.values;
    v_copy_stride_ = Tile::kThreads / Tile::kVRow * v_row_stride;
    v_k_step_ = Tile::kBands * v_row_stride;
    const int m_row_stride = p.n / 4;  // N int32 = N / 4 units per band
    m_thread_ = p.meta + (tid / Tile::kMRow) * m_row_stride + tid % Tile::kMRow;
    if constexpr (Tile::kProducerWarp) m_thread_ = p.meta;
    m_copy_stride_ = Tile::kThreads / Tile::kMRow * m_row_stride;
    m_k_step_ = Tile::kBands * m_row_stride;
    if constexpr (Tile::kGrouped) {
      constexpr int kRowChunks = Tile::kTileN / 8;
      s_copy_ = keep(int{tid < max(1, Tile::kTileK >> p.group_shift) * kRowChunks});
      s_src_ = keep(tid / kRowChunks * p.n + tid % kRowChunks * 8);
    }
    // With wgmma a warp reads only its own word (j0) of each 16-byte values
    // unit and of each lane's 16-byte scale unit, and one metadata word:
    // n-block j0's, which the format gives to lanes t = 2 (j0 % 2) and
    // 2 (j0 % 2) + 1 of each group of four (word j0 / 2; selector j0 % 2).
    // The wgmma's one selector must serve all four warps, so every warp
    // takes selector 0 and a lane (g, t) of an odd warp reads lane (g, t ^ 2)'s
    // word: the registers of lanes t = 0, 1 are then what selector 1 would
    // have taken from lanes t = 2, 3 (the same chunks: chunk half t % 2).
    if constexpr (Tile::kWgmma) {
      const int first_band_run = warp_k_ * Tile::kBandsPerWarp * Tile::kRuns + first_run();
      v_read_ = keep(16 * (Tile::kAStage + first_band_run * 32 + lane_) + 4 * j0());
      m_read_ = keep(16 * (Tile::kAStage + Tile::kVStage + first_band_run * 16) + 8 * (lane_ ^ (2 * (j0() % 2))) +
                     4 * (j0() / 2));
      s_read_ = keep(16 * (Tile::kAStage + Tile::kVStage + Tile::kMStage + first_run() * kWarpCols / 8 + lane_ / 4) +
                     4 * j0());
    } else {
      v_read_ = keep(16 * (Tile::kAStage + (warp_k_ * Tile::kBandsPerWarp * Tile::kWarpsN + warp_n_) * 32 + lane_));
      m_read_ = keep(16 * (Tile::kAStage + Tile::kVStage + (warp_k_ * Tile::kBandsPerWarp * Tile::kWarpsN + warp_n_) * 16) +
                     8 * lane_);
      s_read_ = keep(16 * (Tile::kAStage + Tile::kVStage + Tile::kMStage + warp_n_ * kWarpCols / 8 + lane_ / 4));
    }
    if constexpr (kScaleOncePossible) {
      // The one group row of the warp's share of a k-tile (scale-once path).
      const int s_row = (warp_k_ * Tile::kBandsPerWarp * 32) >> p.group_shift;
      s_read_once_ = keep(s_read_ + s_row * (2 * Tile::kTileN));
    }
    // ldmatrix.x4 addresses of x (see load_band): band b's chunk is
    // (4 b + l / 8) ^ (l % 8); the XOR touches the low 3 bits, 4 (b % 2) +
    // l / 8, so bands i and i + 2 of the warp differ by 8 chunks (its first
    // band is even when it has 2 or more) and kXReads addresses cover all.
    // Where the band pairs stay a loop, only the row's address is kept.
    const int x_row = (row_block0_ * 8 + lane_ % 8) * XS::kRowUnits;
#pragma unroll
    for (int i = 0; i < kXReads; ++i) {
      const int band = warp_k_ * Tile::kBandsPerWarp + i;
      const int chunk = kBandsUnrolled ? (band * 4 + lane_ / 8) ^ (lane_ % 8) : 0;
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
    LoadCursor load{begin / k_tiles_, begin % k_tiles_, nullptr, nullptr};
    load.v = v_thread_ + load.k_tile * v_k_step_ + load.n_tile * Tile::kVRow;
    load.m = m_thread_ + load.k_tile * m_k_step_ + load.n_tile * Tile::kMRow;

    if constexpr (Tile::kTmaX) x_bars_.init(Tile::kStages);
    zero(acc_);
    // Both streams (producer warp or not) compute a stage and end a tile alike.
    const auto compute = [&](uint32_t stage) { compute_stage(stage); };
    const auto end_tile = [&](int n_tile, uint32_t) {
      finish_tile(n_tile, total);
      zero(acc_);
    };
    if constexpr (Tile::kProducerWarp) {
      stream_stripe_producer<Tile::kStages, Tile::kWarps>(
          smem_base_, kStageBytes, count, k_tiles_, load.n_tile, load.k_tile,
          [&](uint32_t stage, bool hint) {
            load_stage_producer(stage, load, hint);
            step(load);
          },
          compute, end_tile);
    } else {
      stream_stripe<Tile::kStages, false>(
          smem_base_, kStageBytes, count, k_tiles_, load.n_tile, load.k_tile,
          [&](uint32_t stage, bool hint) {
            load_stage(stage, load, hint);
            step(load);
          },
          compute, end_tile);
    }
  }

 private:
  static constexpr int kStageBytes = 16 * Tile::kStage;
  static constexpr int kACopies = (Tile::kAStage + Tile::kThreads - 1) / Tile::kThreads;
  static constexpr int kVCopies = Tile::kVStage / Tile::kThreads;
  static constexpr int kMCopies = (Tile::kMStage + Tile::kThreads - 1) / Tile::kThreads;

  static_assert(Tile::kThreads % Tile::kVRow == 0 && Tile::kThreads % Tile::kMRow == 0,
                "a thread copies the same unit of every kThreads / kVRow-th band");

  // Position in the (n-tile, k-tile) iteration space (k fastest) of the
  // next copies to issue, with this thread's first values and metadata
  // sources of that tile: stepped pointers, as in the dense kernel's
  // producer (tile offsets in 16-byte units are < 2^31).
  struct LoadCursor {
    int n_tile, k_tile;
    const int4 *v, *m;
  };
  __device__ void step(LoadCursor& c) const {
    if (++c.k_tile == k_tiles_) {
      c.k_tile = 0;
      ++c.n_tile;
      c.v = v_thread_ + c.n_tile * Tile::kVRow;
      c.m = m_thread_ + c.n_tile * Tile::kMRow;
    } else {
      c.v += v_k_step_;
      c.m += m_k_step_;
    }
  }

  // L2 prefetches of what the pipeline's prologue will copy, the values,
  // metadata and scales of the stripe's first kStages - 1 iterations
  // (overlap_previous_grid): one band's run (contiguous) a request.
  __device__ void prefetch_prologue(int begin, int end) const {
    const int tiles = min(end - begin, Tile::kStages - 1);
    for (int r = threadIdx.x; r < tiles * Tile::kBands; r += Tile::kThreads) {
      const int it = begin + r / Tile::kBands;
      const int n_tile = it / k_tiles_, k_tile = it - n_tile * k_tiles_;
      const size_t band = static_cast<size_t>(k_tile) * Tile::kBands + r % Tile::kBands;
      prefetch_l2(p_.values + band * (p_.n / 2) + n_tile * Tile::kVRow, 16 * Tile::kVRow);
      prefetch_l2(p_.meta + band * (p_.n / 4) + n_tile * Tile::kMRow, 16 * Tile::kMRow);
    }
    prefetch_scales_l2<Tile>(p_.scales, p_.n, p_.group_shift, k_tiles_, begin, end, tiles);
  }

  // x tiles keep their 16-byte chunks XOR-swizzled by row (SwizzledX).
  using XS = SwizzledX<Tile::kTileM, Tile::kAChunksPerRow, Tile::kTmaX>;
  __device__ static int a_offset(int row, int chunk) { return XS::offset(row, chunk); }

  // Stage layout (16-byte units): x tile, values, metadata, scale rows.
  __device__ void load_stage(uint32_t stage, const LoadCursor& at, bool hint) {
    load_x_stage<Tile, XS>(x_bars_, x_map_, p_.x, stage, at.k_tile, a_src_, a_dst_, a_copy_, a_valid_);

    // Values and metadata: kBands rows of each array, copied as they are
    // (a band's runs are contiguous), both streamed once: evict-first.
    const uint32_t v_dst = stage + 16 * (Tile::kAStage + threadIdx.x);
#pragma unroll
    for (int j = 0; j < kVCopies; ++j) {
      cp_async16_weights(v_dst + 16 * j * Tile::kThreads, at.v + j * v_copy_stride_, evict_first_, hint);
    }
    const uint32_t m_dst = stage + 16 * (Tile::kAStage + Tile::kVStage + threadIdx.x);
#pragma unroll
    for (int j = 0; j < kMCopies; ++j) {
      if (Tile::kMStage % Tile::kThreads == 0 || j * Tile::kThreads + static_cast<int>(threadIdx.x) < Tile::kMStage)
        cp_async16_weights(m_dst + 16 * j * Tile::kThreads, at.m + j * m_copy_stride_, evict_first_, hint);
    }

    // Scales: the group rows this k-tile touches (one when a group spans
    // several k-tiles).
    if constexpr (Tile::kGrouped) {
      static_assert(Tile::kSStage <= Tile::kThreads, "one scale copy a thread at most");
      if (s_copy_) {
        // (K / group) N < 2^32 scales (16 <= group, K N / 32 < 2^31 units).
        const unsigned first_row = static_cast<unsigned>(at.k_tile * Tile::kTileK) >> p_.group_shift;
        const unsigned offset = first_row * p_.n + at.n_tile * Tile::kTileN + s_src_;
        cp_async16(stage + 16 * (Tile::kAStage + Tile::kVStage + Tile::kMStage + threadIdx.x), p_.scales + offset);
      }
    }
  }

  // kProducerWarp: the stage by the copy engine, on the stage's barrier, as
  // the dense kernel's load_stage_producer: lane 0 arms the barrier for all
  // of the stage's bytes and copies x's boxes; lanes 1 .. kBands copy a
  // band's values row each (kVRow units, contiguous in global memory and in
  // the stage), the next kBands lanes its metadata row (kMRow units), both
  // evict-first where `hint`. Per-channel tiles only (sparse_dispatch.cu):
  // with group scales the producer measured slower (session 21; its
  // scale-row copies are in 27d0224's candidates/sparse-producer.patch).
  __device__ void load_stage_producer(uint32_t stage, const LoadCursor& at, bool hint) const {
    static_assert(!Tile::kGrouped, "no group-scale rows in a producer warp's 2:4 stage");
    static_assert(1 + 2 * Tile::kBands <= 32, "a copy a lane");
    const uint32_t bar = x_bars_.of(stage);
    if (lane_ == 0) {
      mbarrier_arrive_expect_tx(bar, 16 * (Tile::kAStage + Tile::kVStage + Tile::kMStage));
      x_bars_.template copy_boxes<Tile::kTileK / Tile::kXBoxK, Tile::kXBoxK>(
          stage, bar, x_map_, at.k_tile * Tile::kTileK, [](int b) { return b * XS::kHalfUnits; });
    }
    __syncwarp();
    const int r = lane_ - 1;
    if (r >= 0 && r < Tile::kBands) {
      bulk_copy_weights(stage + 16 * (Tile::kAStage + r * Tile::kVRow), at.v + r * (p_.n / 2),
                        16 * Tile::kVRow, bar, evict_first_, hint);
    } else if (r >= Tile::kBands && r < 2 * Tile::kBands) {
      const int b = r - Tile::kBands;
      bulk_copy_weights(stage + 16 * (Tile::kAStage + Tile::kVStage + b * Tile::kMRow), at.m + b * (p_.n / 4),
                        16 * Tile::kMRow, bar, evict_first_, hint);
    }
  }

  // Group scales applied in fp32 once per k-tile where this warp's share of
  // it (32 * kBandsPerWarp rows) lies in one group: the mmas take the
  // unscaled codes (exact in 16 bits) into fresh accumulators, saving the
  // four half2 multiplies a values word costs otherwise.
  static constexpr bool kScaleOncePossible = Tile::kGrouped && !Tile::kWgmma && kRB <= 2;
  static constexpr int kLog2WarpK = log2_exact(32 * Tile::kBandsPerWarp);

  __device__ void compute_stage(uint32_t stage) {
    if constexpr (Tile::kWgmma) {
      compute_stage_wgmma(stage);
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

  __device__ void compute_stage_scaled_once(uint32_t stage) {
    float part[kRB][4][4];
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) part[rb][j][e] = 0.f;
    multiply_stage<false>(stage, part);
    const uint4 s_raw = ld_shared16(stage + s_read_once_);
    const uint32_t scale_words[4] = {s_raw.x, s_raw.y, s_raw.z, s_raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Low half: output column 16 j + g (accumulator elements 0, 1); high: + 8.
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

  // One band's operands (k32 of the warp's 64 columns), as this lane reads them.
  struct BandOperands {
    uint4 values;        // value words of the run's 4 n-blocks
    uint2 meta;          // metadata registers for the pairs (0, 1), (2, 3)
    uint4 scales;        // group scales (scaled bands only)
    uint32_t x[kRB][4];  // x^T B fragments (k32 x n8), one per row block
  };

  // Issues the shared-memory reads of band i of this warp's share of the stage.
  template <bool kScaled>
  __device__ void load_band(uint32_t stage, int i, BandOperands& op) const {
    const int band = warp_k_ * Tile::kBandsPerWarp + i;
    // One 16-byte load of value words, one 8-byte load of metadata.
    op.values = ld_shared16(stage + v_read_ + 16 * 32 * Tile::kRuns * i);
    op.meta = ld_shared8(stage + m_read_ + 16 * 16 * Tile::kRuns * i);
    op.scales = make_uint4(0, 0, 0, 0);
    if constexpr (kScaled) {
      const int s_row = (band * 32) >> p_.group_shift;
      op.scales = ld_shared16(stage + s_read_ + s_row * (2 * Tile::kTileN));
    }
    // x^T fragments (k32 x n8): ldmatrix.x4 of 8 rows x 32 columns of x.
    // Matrix q (addressed by lanes 8q .. 8q + 7) is k 8q .. 8q + 7, so
    // lane (g, t) gets x[g][8q + 2t, 8q + 2t + 1] in register q: the
    // m16n8k32 B layout (k rows 2t + 8q, + 1; column g). The swizzle XORs
    // the chunk with the row's low bits, l % 8 for every row block.
    uint32_t x_band;
    if constexpr (kBandsUnrolled) {
      x_band = stage + x_read_[i % kXReads] + 16 * XS::kHalfUnits * (i / kXReads);
    } else {
      x_band = stage + x_read_[0] + 16 * XS::chunk_units((band * 4 + lane_ / 8) ^ (lane_ % 8));
    }
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb) {
      ldmatrix_x4(op.x[rb], x_band + 16 * rb * 8 * XS::kRowUnits);
    }
  }

  // Dequantizes one band's values (scaled: times their group scales) and
  // multiplies them by every row block's x fragment, into `acc`.
  template <bool kScaled>
  __device__ void multiply_band(const BandOperands& op, float (&acc)[kRB][4][4]) const {
    const uint32_t words[4] = {op.values.x, op.values.y, op.values.z, op.values.w};
    const uint32_t scale_words[4] = {op.scales.x, op.scales.y, op.scales.z, op.scales.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // The format's nibble interleave makes the dense dequant produce the
      // A registers in order: {a0, a1, a2, a3} = {f0[0], f0[1], f1[0], f1[1]}
      // (a0, a2: n-row g; a1, a3: n-row g + 8).
      uint32_t f0[2], f1[2];
      Dtype<T>::dequant(words[j], f0, f1);
      uint32_t a[4] = {f0[0], f0[1], f1[0], f1[1]};
      if constexpr (kScaled) {
        const T2 s = as_t2<T2>(scale_words[j]);
        scale_sparse_fragment<T>(a, s);
      }
      // Metadata word j / 2 serves n-blocks 2 (j / 2) (selector 0, from
      // lanes t = 0, 1) and 2 (j / 2) + 1 (selector 1, lanes t = 2, 3).
      const uint32_t meta = (j / 2 == 0) ? op.meta.x : op.meta.y;
#pragma unroll
      for (int rb = 0; rb < kRB; ++rb) {
        if (j % 2 == 0) {
          SparseMmaOp<T>::template run<0>(a, op.x[rb], meta, acc[rb][j]);
        } else {
          SparseMmaOp<T>::template run<1>(a, op.x[rb], meta, acc[rb][j]);
        }
      }
    }
  }

  // This warp's bands of the stage into `acc`; kScaled: the dequantized
  // values are multiplied by their group scales first (exactly the
  // reference's W_hat = (code - 8) * s rounded to T). Pipelined as the dense
  // kernel's steps; with 4 row blocks the band pairs stay a loop.
  template <bool kScaled>
  __device__ void multiply_stage(uint32_t stage, float (&acc)[kRB][4][4]) {
    pipelined_steps<Tile::kBandsPerWarp, !kBandsUnrolled, (kRB <= 4), BandOperands>(
        [&](int i, BandOperands& op) { load_band<kScaled>(stage, i, op); },
        [&](const BandOperands& op) { multiply_band<kScaled>(op, acc); });
  }

  // wgmma: this warp dequantizes its word (n-block j0) of every band's values
  // unit, in each of its warpgroup's runs, into a register A fragment
  // (scaled by its group scales where grouped, as multiply_band does) and
  // reads the matching metadata word (see m_read_); then the warpgroup
  // multiplies each band with the k32 x kTileM slice of x^T, one
  // wgmma.mma_async.sp m64n{kTileM}k32 a band and run, selector 0. As the
  // dense compute_stage_wgmma, the group is waited for here, so the stage's
  // x stays untouched until the wgmmas have read it.
  __device__ void compute_stage_wgmma(uint32_t stage) {
    constexpr int kS = Tile::kRunsPerWarpgroup, kBands = Tile::kBandsPerWarp;
    // kProducerWarp: the values come on x's barrier, so the wait goes first.
    if constexpr (Tile::kProducerWarp) x_bars_.wait(stage);
    uint32_t afrag[kS][kBands][4], meta[kS][kBands];
#pragma unroll
    for (int i = 0; i < kBands; ++i) {
      const int band = warp_k_ * kBands + i;
#pragma unroll
      for (int run = 0; run < kS; ++run) {
        const uint32_t word = ld_shared4(stage + v_read_ + 16 * 32 * (Tile::kRuns * i + run));
        meta[run][i] = ld_shared4(stage + m_read_ + 16 * 16 * (Tile::kRuns * i + run));
        uint32_t f0[2], f1[2];
        Dtype<T>::dequant(word, f0, f1);
        uint32_t(&a)[4] = afrag[run][i];
        a[0] = f0[0], a[1] = f0[1], a[2] = f1[0], a[3] = f1[1];
        if constexpr (Tile::kGrouped) {
          const int s_row = (band * 32) >> p_.group_shift;
          const T2 s = as_t2<T2>(ld_shared4(stage + s_read_ + s_row * (2 * Tile::kTileN) + run * (2 * kWarpCols)));
          scale_sparse_fragment<T>(a, s);
        }
      }
    }
    // x by TMA: wait only now, after the dequantize, which needs no x.
    if constexpr (!Tile::kProducerWarp) x_bars_.wait(stage);
    float d[kS][Tile::kTileM / 2];  // run s's D fragment (accumulators_to_wgmma)
    accumulators_to_wgmma(acc_, d);
    wgmma_fence();
#pragma unroll
    for (int i = 0; i < kBands; ++i) {
      const int band = warp_k_ * kBands + i;
      // The band's 64 bytes in its 128-byte half's plane (two bands a half).
      const uint64_t desc = wgmma_descriptor_sw128(stage + 16 * (band / 2 * XS::kHalfUnits) + 64 * (band % 2));
#pragma unroll
      for (int run = 0; run < kS; ++run)
        WgmmaSpRS<T, Tile::kTileM>::template run<0>(d[run], afrag[run][i], meta[run][i], desc);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_to_accumulators(d, acc_);
  }

  // The first of the kRunsPerWarpgroup runs this warp's (warpgroup's, with
  // wgmma) accumulators cover; its n-block in them (wgmma; 0 otherwise).
  __device__ int first_run() const { return warp_n_ * Tile::kRunsPerWarpgroup; }
  __device__ int j0() const { return Tile::kWgmma ? warp_ % 4 : 0; }
  // The column, from the n-tile's start, of this lane's accumulator set j,
  // element half (0: n-row g, elements 0 and 1; 1: g + 8, elements 2, 3).
  __device__ int tile_col(int j, int half) const {
    if constexpr (Tile::kWgmma) {
      return (first_run() + j) * kWarpCols + 16 * j0() + 8 * half + lane_ / 4;
    } else {
      return warp_n_ * kWarpCols + 16 * j + 8 * half + lane_ / 4;
    }
  }

  // End of this block's share of n-tile `n_tile` (stripe.cuh);
  // whoever completes the tile writes the output.
  __device__ void finish_tile(int n_tile, int total) {
    const TileReduction<Tile, kRB, kJ> reduction{reinterpret_cast<float4*>(red_), p_.workspace,
                                                 p_.locks, p_.stripes, k_tiles_, warp_k_, warp_mn_,
                                                 lane_};
    // Per-channel scales are loaded before the cross-block reduction, so
    // their global round trip overlaps it instead of following it (H200,
    // M = 1: 4096^2 7.36 -> 6.81 us, 11008x4096 11.6 -> 11.0); not in the
    // 128-row tiles, whose registers are full. (The same change made the
    // dense kernel 2-8% slower at per-channel, and it stays as it was.)
    float scales[kJ][2];
    if constexpr (kRB <= 4) load_column_scales(n_tile, scales);
    if (reduction.finish(acc_, n_tile, total, [this](int rb, int j) { return workspace_index(rb, j); })) {
      if constexpr (kRB > 4) load_column_scales(n_tile, scales);
      write_output(n_tile, scales);
    }
  }

  // The scales of this lane's output columns 16 j + g + 8 half of its run
  // in n-tile `n_tile`; ones for grouped tiles and warps that never write.
  // Per-channel scales are in the grouped order too (marlin_layout.h).
  __device__ void load_column_scales(int n_tile, float (&s)[kJ][2]) const {
    // The run's first column (mma.sp: the warp's run; wgmma: run j's).
    const int col0 = n_tile * Tile::kTileN + (Tile::kWgmma ? first_run() : warp_n_) * kWarpCols;
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // The column in the run.
        const int c = (Tile::kWgmma ? 16 * j0() : 16 * j) + 8 * half + lane_ / 4;
        s[j][half] = 1.f;
        if (!Tile::kGrouped && warp_k_ == 0)
          s[j][half] = to_float(p_.scales[col0 + (Tile::kWgmma ? j * kWarpCols : 0) + MarlinGroupedScaleSource(c)]);
      }
  }

  __device__ int workspace_index(int rb, int j) const {
    if constexpr (Tile::kWgmma) {
      return (((row_block0_ + rb) * 4 + j0()) * Tile::kRuns + first_run() + j) * 32 + lane_;
    } else {
      return (((row_block0_ + rb) * 4 + j) * Tile::kWarpsN + warp_n_) * 32 + lane_;
    }
  }

  // Accumulator layout (m16n8, here n16 x m8): lane (g, t) holds output
  // columns 16 j + g (elements 0, 1) and 16 j + g + 8 (elements 2, 3), each
  // for rows 2 t and 2 t + 1 of the row block.
  // scales: load_column_scales's.
  __device__ void write_output(int n_tile, const float (&scales)[kJ][2]) {
    const int col0 = n_tile * Tile::kTileN + (Tile::kWgmma ? 0 : warp_n_ * kWarpCols);
    const int g = lane_ / 4, t = lane_ % 4;
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // The column from col0 (mma.sp: in the run; wgmma: in the n-tile).
        const int c = Tile::kWgmma ? tile_col(j, half) : 16 * j + 8 * half + g;
        const float s = scales[j][half];
#pragma unroll
        for (int rb = 0; rb < kRB; ++rb) {
          const int row = (row_block0_ + rb) * 8 + 2 * t;
          T* out = p_.y + static_cast<size_t>(row) * p_.n + col0 + c;
          if (row < p_.rows) out[0] = from_float(acc_[rb][j][2 * half] * s);
          if (row + 1 < p_.rows) out[p_.n] = from_float(acc_[rb][j][2 * half + 1] * s);
        }
      }
    }
  }

  __device__ static float to_float(T v) { return Dtype<T>::to_floats(T2(v, v)).x; }
  __device__ static T from_float(float v) { return Dtype<T>::from_floats(v, v).x; }

  const SparseParams<T> p_;
  const void* x_map_;
  int4* red_;
  const uint32_t smem_base_;
  // kTmaX: the stages' x barriers, after the reduction scratch.
  TmaXBarriers<kStageBytes> x_bars_{smem_base_ + 16 * (Tile::kStages * Tile::kStage + Tile::kRed), smem_base_};
  const int warp_, lane_, warp_n_, warp_mn_, warp_k_, row_block0_;
  const int k_tiles_, n_tiles_;
  const uint64_t evict_first_;
  int a_src_[kACopies], a_dst_[kACopies];
  bool a_copy_[kACopies], a_valid_[kACopies];
  const int4* v_thread_;  // this thread's first values source in tile (0, 0)
  const int4* m_thread_;  // ... and metadata source
  int v_copy_stride_, m_copy_stride_;  // 16-byte units between its copies of a tile
  int v_k_step_, m_k_step_;            // ... from a tile to the next along k
  // Grouped scales: whether this thread copies 16 bytes of a k-tile's scale
  // rows, and from where (elements past the rows' start at the n-tile).
  int s_copy_ = 0, s_src_ = 0;
  // Byte offsets in a stage of this lane's first values, metadata and scale
  // reads; the scale row of the scale-once path; x_read_[i]: the ldmatrix
  // address of the warp's band i (i < 2), or of the row (bands in a loop).
  static constexpr int kXReads = !kBandsUnrolled ? 1 : Tile::kBandsPerWarp < 2 ? Tile::kBandsPerWarp : 2;
  static_assert(Tile::kBandsPerWarp <= 2 || Tile::kBandsPerWarp % 2 == 0, "see x_read_");
  int v_read_, m_read_, s_read_, s_read_once_ = 0, x_read_[kXReads];
  // acc_[rb][j]: the m16n8 accumulator of output columns 16 j .. 16 j + 15
  // of the warp's run (as mma rows) and rows 8 rb .. 8 rb + 7 of x; with
  // wgmma, of n-block j0 of the warpgroup's run j (tile_col).
  float acc_[kRB][kJ][4];
};

template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::kBlockThreads, Tile::kBlocksPerSM)
    marlin_sparse_kernel(const SparseParams<T> p) {
  static_assert(Tile::kFits, "the tile's pipeline stages do not fit in shared memory");
  phase(kEntry);
  extern __shared__ int4 smem[];
  SparseBlock<T, Tile> block(p, smem);
  block.run();
}

// The kTmaX tiles' kernel (compute capability 9.0+; x_by_tma picks it): as
// marlin_sparse_kernel, with a tensor map of this chunk's x
// (encode_x_tensor_map: boxes of 64 columns x kTileM rows, 128-byte
// swizzle), read where the parameter lives. No body below sm_90, as
// marlin_kernel_tma_x.
template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::kBlockThreads, Tile::kBlocksPerSM)
    sparse_kernel_tma_x(const SparseParams<T> p, const __grid_constant__ CUtensorMap x_map) {
  static_assert(Tile::kFits && Tile::kTmaX, "a kTmaX tile whose stages fit");
#if JAX_MARLIN_HAS_TMA
  if constexpr (Tile::kWgmma && !JAX_MARLIN_HAS_WGMMA) {
    __trap();  // sm_90 code without wgmma: never launched
  } else {
    phase(kEntry);
    extern __shared__ int4 smem[];
    SparseBlock<T, Tile> block(p, align_shared<1024>(smem), &x_map);
    block.run();
  }
#else
  __trap();
#endif
}

}  // namespace jax_marlin::cuda
