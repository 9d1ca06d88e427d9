// How a block works through its stripe of (n-tile, k-tile) iterations,
// shared by the dense and the 2:4 sparse kernel:
//  - stream_stripe: the multi-stage cp.async pipeline over the iterations;
//  - TileReduction: how the warps' accumulators become finished output
//    tiles: a tree reduction over the block's K split through shared memory,
//    then a reduction over the blocks whose stripes share the n-tile, through
//    the global workspace (the last block to arrive sums the parts in block
//    order, so results are deterministic).
#pragma once

#include "marlin_device.cuh"
#include "marlin_wgmma.cuh"  // fence_proxy_async

namespace jax_marlin::cuda {

// Where a call's time goes, in probe builds only (-DJAX_MARLIN_PHASES: the
// tile sweep's --phases): thread 0 of each block records %globaltimer
// (nanoseconds, one clock for all SMs) and clock64 (its SM's cycles) at
// each phase. In every other build phase() is empty.
enum Phase { kEntry, kSetUp, kPrologueIssued, kFirstStage, kLastCompute, kReduced, kExit, kPhases };
#ifdef JAX_MARLIN_PHASES
constexpr int kPhaseBlocks = 1024;
__device__ unsigned long long g_phase_ns[kPhaseBlocks][kPhases];
__device__ long long g_phase_clk[kPhaseBlocks][kPhases];
__device__ __forceinline__ void phase(Phase at) {
  if (threadIdx.x == 0 && blockIdx.x < kPhaseBlocks) {
    unsigned long long ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    g_phase_ns[blockIdx.x][at] = ns;
    g_phase_clk[blockIdx.x][at] = clock64();
  }
}
#else
__device__ __forceinline__ void phase(Phase) {}
#endif

// Programmatic dependent launch (sm_90+; the launch allows it where the
// device has it, launch_util.h): this grid may start while the kernel before
// it in the stream is still finishing, e.g. on the SMs its early blocks have
// left. Until griddepcontrol.wait returns, nothing written by earlier
// kernels may be read and nothing may be written (an earlier kernel may
// still read a buffer XLA reuses for our output), so the block only does
// what is safe anyway: `prefetch` pulls its first weight tiles into L2
// (prefetch_l2). That turns the previous kernel's tail, when HBM idles as
// its last blocks reduce, into this kernel's ramp. The early trigger lets
// the next kernel do the same on our tail; it only lets that kernel be
// scheduled, its own wait still waits for all of this grid.
// `overlapped` (the kernel's params.overlapped, set by launch_overlapping):
// whether this launch really overlaps its predecessor. If not (a plain
// launch, or a call traced into a CUDA graph of its own), nothing is done:
// the prefetch would only put the same bytes' requests ahead of the
// prologue's copies.
template <typename Prefetch>
__device__ __forceinline__ void overlap_previous_grid(bool overlapped, Prefetch&& prefetch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (!overlapped) return;
  prefetch();
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// For overlap_previous_grid's prefetch: L2 prefetches of the scale rows the
// stripe's first `tiles` iterations (from `begin`) read with group scales,
// or with per-channel scales the rows of the stripe's first and last n-tile.
template <typename Tile, typename T>
__device__ __forceinline__ void prefetch_scales_l2(const T* scales, int n, int group_shift,
                                                   int k_tiles, int begin, int end, int tiles) {
  if constexpr (Tile::kGrouped) {
    const int rows = max(1, Tile::kTileK >> group_shift);
    for (int r = threadIdx.x; r < tiles * rows; r += Tile::kThreads) {
      const int it = begin + r / rows;
      const int n_tile = it / k_tiles, k_tile = it - n_tile * k_tiles;
      const int row = ((k_tile * Tile::kTileK) >> group_shift) + r % rows;
      prefetch_l2(scales + static_cast<size_t>(row) * n + n_tile * Tile::kTileN, 2 * Tile::kTileN);
    }
  } else if (threadIdx.x < 2 && end > begin) {
    const int n_tile = (threadIdx.x == 0 ? begin : end - 1) / k_tiles;
    prefetch_l2(scales + n_tile * Tile::kTileN, 2 * Tile::kTileN);
  }
}

// Streams `count` iterations through kStages shared-memory stages of
// stage_bytes each, from smem_base. issue(stage, hint) starts the cp.async
// copies of the next iteration into `stage` (and advances the caller's load
// cursor), the weights with the L2 evict-first hint where `hint`;
// compute(stage) consumes a landed stage; end_tile(n_tile, stage) runs after
// the last k-tile of each n-tile (and after the stripe's last iteration),
// with that k-tile's stage, which stays as it landed until end_tile returns.
// The stripe starts at (n_tile, k_tile); k_tiles per n-tile.
// kFenceAsyncProxy: compute reads through the async proxy (wgmma).
template <int kStages, bool kFenceAsyncProxy, typename Issue, typename Compute, typename EndTile>
__device__ __forceinline__ void stream_stripe(uint32_t smem_base, uint32_t stage_bytes, int count,
                                              int k_tiles, int n_tile, int k_tile, Issue&& issue,
                                              Compute&& compute, EndTile&& end_tile) {
  // Prologue: fill all but one stage. Every iteration commits exactly one
  // group (possibly empty) so that wait_group<kStages - 2> always means
  // "the stage about to be consumed has landed".
  // The prologue's copies go without the L2 cache hint (issue's second
  // argument): ptxas 13.0 can fold a uniform stage address into the
  // cache-hint copy (LDGSTS [R+UR], desc[UR]) and encode uniform registers
  // it never sets, an illegal instruction at run time. It did so in the
  // prologue of several tiles, rolled or unrolled, whenever the registers
  // around it shifted. scripts/check_sass.sh refuses that form.
  phase(kSetUp);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) issue(smem_base + s * stage_bytes, false);
    cp_async_commit();
  }
  phase(kPrologueIssued);

  const uint32_t last_stage = smem_base + (kStages - 1) * stage_bytes;
  uint32_t read_stage = smem_base, write_stage = last_stage;
  for (int i = 0; i < count; ++i) {
    cp_async_wait<kStages - 2>();
    // The async proxy reads shared memory: fence this thread's copies.
    if constexpr (kFenceAsyncProxy) fence_proxy_async();
    // Also guarantees every warp is done with the stage refilled below.
    __syncthreads();
    if (i == 0) phase(kFirstStage);
    if (i + kStages - 1 < count) issue(write_stage, true);
    cp_async_commit();

    compute(read_stage);
    if (i == count - 1) phase(kLastCompute);
    if (k_tile == k_tiles - 1 || i == count - 1) end_tile(n_tile, read_stage);
    if (++k_tile == k_tiles) {
      k_tile = 0;
      ++n_tile;
    }
    read_stage = read_stage == last_stage ? smem_base : read_stage + stage_bytes;
    write_stage = write_stage == last_stage ? smem_base : write_stage + stage_bytes;
  }
  cp_async_wait<0>();
  phase(kExit);
}

// stream_stripe for a block with a producer warp (ProducerWarp tiles): the
// kConsumers warps consume, the first warp of the warpgroup after them
// issues. Each stage has two barriers: `full` (the caller's: issue arms it
// and its copies complete it; compute waits on it) and `empty` here, one
// arrival per consumer thread once compute has returned for the stage, i.e.
// once its reads of the stage (ld.shared, and the wgmmas, which compute
// waits for) are done. The producer refills a stage when its `empty` phase
// completes, kStages iterations after it last filled it; nobody else waits
// for anybody, so the consumers drift apart by up to the stages in flight,
// and end_tile (the consumers only: their barrier is a named one,
// sync_first_threads) delays no copy. issue(stage, hint) as in
// stream_stripe, run by the whole producer warp; compute / end_tile by
// every consumer thread.
struct NoDrain {
  __device__ void operator()() const {}
};
// kTrail: compute(stage, release_previous) may leave the stage's last
// reads (its last wgmma group) in flight; the next compute releases the
// stage (release_previous) once they are done, and drain() waits for all
// of them before a tile ends (end_tile reads the accumulators).
template <int kStages, int kConsumers, bool kTrail = false, typename Issue, typename Compute,
          typename EndTile, typename Drain = NoDrain>
__device__ __forceinline__ void stream_stripe_producer(uint32_t smem_base, uint32_t stage_bytes, int count,
                                                       int k_tiles, int n_tile, int k_tile, Issue&& issue,
                                                       Compute&& compute, EndTile&& end_tile,
                                                       Drain&& drain = {}) {
  __shared__ uint64_t empty[kStages];
  const uint32_t empty0 = static_cast<uint32_t>(__cvta_generic_to_shared(empty));
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(empty0 + 8 * s, 32 * kConsumers);
    fence_mbarrier_init();
  }
  __syncthreads();
  phase(kSetUp);
  // Registers: the producer warpgroup keeps kProducerRegs, the consumers
  // take the rest (consumer_registers).
  constexpr int kProducerRegs = 40;
  constexpr int kConsumerRegs = consumer_registers<32 * kConsumers, kProducerRegs>();
  if (threadIdx.x >= 32 * kConsumers) {
    warpgroup_registers_dec<kProducerRegs>();
    if (threadIdx.x >= 32 * kConsumers + 32) return;  // one producer warp works
    // The stage's k-th refill waits for its (k - 1)-th release: parity
    // (k - 1) % 2 of its `empty` barrier, a bit a stage.
    uint32_t parity = 0;
    int s = 0;
    for (int i = 0; i < count; ++i) {
      if (i >= kStages) {
        mbarrier_wait(empty0 + 8 * s, (parity >> s) & 1u);
        parity ^= 1u << s;
      }
      // The first stages without the L2 hint, as stream_stripe's prologue.
      issue(smem_base + s * stage_bytes, i >= kStages - 1);
      s = s == kStages - 1 ? 0 : s + 1;
    }
    return;
  }
  warpgroup_registers_inc<kConsumerRegs>();
  uint32_t stage = smem_base;
  const uint32_t last_stage = smem_base + (kStages - 1) * stage_bytes;
  // Every consumer thread arrives: an arrival releases the arriving
  // thread's own reads of the stage (PTX memory model), so none of the
  // reads depends on a __syncwarp to be ordered before the refill.
  const auto release = [&](uint32_t s) { mbarrier_arrive(empty0 + 8 * ((s - smem_base) / stage_bytes)); };
  const auto next = [&](uint32_t st) { return st == last_stage ? smem_base : st + stage_bytes; };
  if constexpr (kTrail) {
    // The stripe in runs of stages, each run up to the end of a tile (or
    // of the stripe): inside a run every stage's last wgmma group trails
    // into the next stage's compute, which releases the previous stage;
    // after a run, drain() waits for all groups (a loop exit: no divergent
    // branch around wgmmas in flight, which ptxas would serialize) and the
    // tile ends. The last stage of a run is released by the next run's
    // first compute, as any other; only the stripe's first stage has none
    // before it (peeled), and its last is never refilled.
    if (count == 0) return;
    compute(stage, [] {});
    phase(kFirstStage);
    uint32_t prev = stage;
    stage = next(stage);
    int done = 0, j0 = 1;  // j0: the first run's first stage is the peeled one
    int run = min(count, k_tiles - k_tile);
    for (;;) {
      for (int j = j0; j < run; ++j) {
        compute(stage, [&] { release(prev); });
        prev = stage;
        stage = next(stage);
      }
      j0 = 0;
      drain();
      done += run;
      if (done == count) phase(kLastCompute);
      end_tile(n_tile, prev);
      if (done == count) break;
      ++n_tile;
      run = min(count - done, k_tiles);
    }
  } else {
    for (int i = 0; i < count; ++i) {
      compute(stage);
      if (i == 0) phase(kFirstStage);
      if (i == count - 1) phase(kLastCompute);
      release(stage);
      if (k_tile == k_tiles - 1 || i == count - 1) end_tile(n_tile, stage);
      if (++k_tile == k_tiles) {
        k_tile = 0;
        ++n_tile;
      }
      stage = next(stage);
    }
  }
  phase(kExit);
}

// Where x's 16-byte chunks sit in a stage (16-byte units): XOR-swizzled by
// row (chunk ^ row % 8), so the 8 rows one ldmatrix phase reads fall into 8
// different bank groups. Row-major [row][chunk]; or, where x comes by TMA
// (kByTma), in planes of 128-byte column halves [half][row][chunk ^ row %
// 8], which a TMA box of 64 columns x kTileM rows with the copy engine's
// 128-byte swizzle writes exactly (into 1024-byte aligned stages).
template <int kTileM, int kChunksPerRow, bool kByTma>
struct SwizzledX {
  static constexpr int kRowUnits = kByTma ? 8 : kChunksPerRow;  // between rows
  static constexpr int kHalfUnits = kByTma ? 8 * kTileM : 8;     // between 128-byte halves
  // From a row's start to its chunk c (already swizzled).
  __device__ static int chunk_units(int c) {
    if constexpr (kByTma) {
      return c / 8 * kHalfUnits + c % 8;
    } else {
      return c;
    }
  }
  __device__ static int offset(int row, int chunk) { return row * kRowUnits + chunk_units(chunk ^ (row & 7)); }
};

// x by TMA (kTmaX tiles): one mbarrier a stage (8 bytes each, from
// `barriers`), completed by the stage's copies, and the parity of each one's
// next phase (a bit a stage; a phase completes per use). Stages are
// kStageBytes apart from `stage0`.
template <int kStageBytes>
class TmaXBarriers {
 public:
  __device__ TmaXBarriers(uint32_t barriers, uint32_t stage0) : barriers_(barriers), stage0_(stage0) {}
  // Thread 0 initialises `stages` barriers; the block then synchronises.
  __device__ void init(int stages) const {
    if (threadIdx.x == 0) {
      for (int s = 0; s < stages; ++s) mbarrier_init(barriers_ + 8 * s, 1);
      fence_mbarrier_init();
    }
    __syncthreads();
  }
  // Thread 0: arms `stage`'s barrier with the tile's `bytes` of x and issues
  // its kBoxes copies, box b (kBoxK columns from column k0 + b kBoxK) to
  // stage + 16 dst_units(b).
  template <int kBoxes, int kBoxK, typename DstUnits>
  __device__ void load(uint32_t stage, uint32_t bytes, const void* map, int k0, DstUnits&& dst_units) const {
    if (threadIdx.x != 0) return;
    const uint32_t bar = of(stage);
    mbarrier_arrive_expect_tx(bar, bytes);
    copy_boxes<kBoxes, kBoxK>(stage, bar, map, k0, dst_units);
  }
  // x's boxes as `load` copies them, onto barrier `bar` (ProducerWarp
  // tiles, whose stages also take the weights' copies on it).
  template <int kBoxes, int kBoxK, typename DstUnits>
  __device__ void copy_boxes(uint32_t stage, uint32_t bar, const void* map, int k0, DstUnits&& dst_units) const {
#pragma unroll
    for (int b = 0; b < kBoxes; ++b) tma_load_2d(stage + 16 * dst_units(b), map, k0 + b * kBoxK, 0, bar);
  }
  // Waits until `stage`'s x (and what else came onto its barrier) has landed.
  __device__ void wait(uint32_t stage) {
    const int s = index(stage);
    mbarrier_wait(of(stage), (parity_ >> s) & 1u);
    parity_ ^= 1u << s;
  }
  // `stage`'s barrier.
  __device__ uint32_t of(uint32_t stage) const { return barriers_ + 8 * index(stage); }

 private:
  __device__ int index(uint32_t stage) const { return (stage - stage0_) / kStageBytes; }
  uint32_t barriers_, stage0_;
  uint32_t parity_ = 0;
};

// A thread's share of copying a stage's x tile (kTileM rows x kTileK
// columns), the same in the dense and the 2:4 kernel. Without TMA, each
// thread makes kCopies cp.async copies, planned once (plan_x_copies):
// source offsets from the k-tile's start in x (16-byte units), destinations
// in the stage (bytes), whether the copy exists and whether its row is real.
// `coords(c, row, chunk)` says which chunk of x copy c of the stage moves,
// `offset(row, chunk)` where it goes (16-byte units): the kernel's layout.
template <typename Tile, int kCopies, typename Coords, typename Offset>
__device__ __forceinline__ void plan_x_copies(int rows, int k, Coords&& coords, Offset&& offset,
                                              int (&src)[kCopies], int (&dst)[kCopies],
                                              bool (&copy)[kCopies], bool (&valid)[kCopies]) {
#pragma unroll
  for (int j = 0; j < kCopies; ++j) {
    const int c = j * Tile::kThreads + threadIdx.x;
    int row, chunk;
    coords(c, row, chunk);
    copy[j] = (Tile::kAStage % Tile::kThreads == 0 || c < Tile::kAStage) ? 1 : 0;
    valid[j] = copy[j] && row < rows;
    // Rows past M read nothing (zero-fill) from row 0, a valid address.
    src[j] = (valid[j] ? row * (k / 8) : 0) + chunk;
    dst[j] = 16 * offset(row, chunk);
  }
}

// Copies k-tile `k_tile`'s x into `stage`. By TMA (Tile::kTmaX): one box a
// 128-byte half of the tile's columns, at its plane (the map swizzles it;
// rows past M are outside the map and arrive as zeros). Else the planned
// cp.async copies, rows past M zero-filled; offsets in unsigned 32-bit
// arithmetic (x has < 2^32 16-byte units): one wide multiply-add per
// address instead of a sign extension, a shift and a 64-bit add.
template <typename Tile, typename XS, int kCopies, int kStageBytes>
__device__ __forceinline__ void load_x_stage(const TmaXBarriers<kStageBytes>& bars, const void* map,
                                             const void* x, uint32_t stage, int k_tile,
                                             const int (&src)[kCopies], const int (&dst)[kCopies],
                                             const bool (&copy)[kCopies], const bool (&valid)[kCopies]) {
  if constexpr (Tile::kTmaX) {
    bars.template load<Tile::kTileK / Tile::kXBoxK, Tile::kXBoxK>(
        stage, 16 * Tile::kAStage, map, k_tile * Tile::kTileK, [](int b) { return b * XS::kHalfUnits; });
  } else {
    const auto* x_units = reinterpret_cast<const int4*>(x);
    const unsigned x_tile = static_cast<unsigned>(k_tile) * Tile::kAChunksPerRow;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      if (copy[j]) cp_async16_zfill(stage + dst[j], x_units + (x_tile + src[j]), valid[j]);
    }
  }
}

// The first `kAlign`-byte boundary at or after `smem` (a kTmaX kernel's
// stages; its tile reserves the slack).
template <uint32_t kAlign>
__device__ __forceinline__ int4* align_shared(int4* smem) {
  return smem + ((kAlign - smem_addr(smem) % kAlign) % kAlign) / 16;
}

// acc[rb][j]: a warp's m16n8 fp32 accumulators, for its kRB 8-row blocks of
// x and its kJ n16 sub-tiles.
template <int kRB, int kJ>
using Accumulators = float[kRB][kJ][4];

template <int kRB, int kJ>
__device__ __forceinline__ void zero(Accumulators<kRB, kJ>& acc) {
#pragma unroll
  for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
    for (int j = 0; j < kJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[rb][j][e] = 0.f;
}

template <int kRB, int kJ>
__device__ __forceinline__ void add(Accumulators<kRB, kJ>& acc, int rb, int j, float4 v) {
  acc[rb][j][0] += v.x;
  acc[rb][j][1] += v.y;
  acc[rb][j][2] += v.z;
  acc[rb][j][3] += v.w;
}

template <int kRB, int kJ>
__device__ __forceinline__ float4 as_float4(const Accumulators<kRB, kJ>& acc, int rb, int j) {
  return make_float4(acc[rb][j][0], acc[rb][j][1], acc[rb][j][2], acc[rb][j][3]);
}

// One warp's view of the reduction, made where a tile ends (its fields are
// values the block already holds in registers; it costs nothing to build).
// Tile supplies kWarpsK, kWarpsMN, kTileM and kTileN.
template <typename Tile, int kRB, int kJ>
struct TileReduction {
  float4* red;      // shared scratch: Tile::kRed 16-byte units
  float* workspace;  // global partial sums: two slots a block
  int* locks;       // one arrival counter per n-tile
  int stripes, k_tiles;
  int warp_k, warp_mn, lane;

  // Sums the K-split warps' accumulators into the warps with warp_k == 0,
  // halving the number of live partial sums per round. Slot layout
  // [slot][rb][j][lane]: each warp touches 512 contiguous bytes per (rb, j),
  // so the float4 accesses are bank-conflict free.
  __device__ void within_block(Accumulators<kRB, kJ>& acc) const {
    if constexpr (Tile::kWarpsK > 1) {
#pragma unroll
      for (int half = Tile::kWarpsK / 2; half >= 1; half /= 2) {
        if (warp_k >= half && warp_k < 2 * half) {
          const int slot = (warp_k - half) * Tile::kWarpsMN + warp_mn;
#pragma unroll
          for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
            for (int j = 0; j < kJ; ++j) red[((slot * kRB + rb) * kJ + j) * 32 + lane] = as_float4(acc, rb, j);
        }
        __syncthreads();
        if (warp_k < half) {
          const int slot = warp_k * Tile::kWarpsMN + warp_mn;
#pragma unroll
          for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
            for (int j = 0; j < kJ; ++j) add(acc, rb, j, red[((slot * kRB + rb) * kJ + j) * 32 + lane]);
        }
        __syncthreads();
      }
    }
  }

  // The end of this block's share of n-tile `n_tile`: reduce over the K
  // split, then over the blocks sharing the tile. Returns whether this warp
  // holds the finished tile (warp_k == 0 of the block that completes it);
  // the caller then writes it. index(rb, j): the lane's float4 of fragment
  // (rb, j) in a workspace slot, the same in every block (each lane stores
  // and reads back its own fragments, as coalesced float4s).
  template <typename Index>
  __device__ bool finish(Accumulators<kRB, kJ>& acc, int n_tile, int total, Index index) const {
    within_block(acc);
    const int first = stripe_of(n_tile * k_tiles, total, stripes);
    const int last = stripe_of((n_tile + 1) * k_tiles - 1, total, stripes);
    const bool owner = warp_k == 0;
    if (first != last) {
      if (owner) {
        float4* mine = slot(static_cast<int>(blockIdx.x), n_tile, total);
#pragma unroll
        for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
          for (int j = 0; j < kJ; ++j) __stcg(&mine[index(rb, j)], as_float4(acc, rb, j));
      }
      // Only the kThreads consumers get here where a producer warp has left.
      constexpr int kArriving = Tile::kBlockThreads == Tile::kThreads ? 0 : Tile::kThreads;
      if (!last_to_arrive<kArriving>(locks + n_tile, last - first + 1)) return false;
      phase(kReduced);
      if (owner) sum_parts(acc, n_tile, total, first, last, index);
    }
    return owner;
  }

  // Parts summed a batch at a time, every load of a batch in flight before
  // its adds: on a small layer this tail is on the critical path of the
  // whole call, and one L2 round trip per part (with the slot's 64-bit
  // division in front of each) cost ~0.5 us a part. The sum is in block
  // order as before (bit-identical, deterministic).
  static constexpr int kPartBatch = kRB * kJ >= 16 ? 1 : 16 / (kRB * kJ);

  template <typename Index>
  __device__ void sum_parts(Accumulators<kRB, kJ>& acc, int n_tile, int total, int first, int last,
                            Index index) const {
    // Every block after `first` starts its stripe inside this n-tile, so its
    // part is in its slot 0; only `first`'s slot takes a division.
    const float4* first_part = slot(first, n_tile, total);
    const float4* slots = reinterpret_cast<const float4*>(workspace);
    zero(acc);
    for (int b0 = first; b0 <= last; b0 += kPartBatch) {
      float4 parts[kPartBatch][kRB][kJ];
#pragma unroll
      for (int i = 0; i < kPartBatch; ++i) {
        const int b = b0 + i;
        if (b > last) break;
        const float4* part = b == first ? first_part : slots + static_cast<size_t>(2 * b) * kSlotUnits;
#pragma unroll
        for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
          for (int j = 0; j < kJ; ++j) parts[i][rb][j] = __ldcg(&part[index(rb, j)]);
      }
#pragma unroll
      for (int i = 0; i < kPartBatch; ++i) {
        if (b0 + i > last) break;
#pragma unroll
        for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
          for (int j = 0; j < kJ; ++j) add(acc, rb, j, parts[i][rb][j]);
      }
    }
  }

  // Block b's workspace slot for n-tile `n_tile`: a stripe shares at most its
  // first and its last n-tile with other blocks, so two slots a block.
  static constexpr int kSlotUnits = Tile::kTileM * Tile::kTileN / 4;  // float4s a slot
  __device__ float4* slot(int b, int n_tile, int total) const {
    const int begin = static_cast<int>(static_cast<long long>(b) * total / stripes);
    const int which = begin / k_tiles == n_tile ? 0 : 1;
    return reinterpret_cast<float4*>(workspace) + static_cast<size_t>(2 * b + which) * kSlotUnits;
  }
};

}  // namespace jax_marlin::cuda
