// The prefill kernel (sm_90a): y = x W for many rows of x at once (prompt
// prefill, large batches), where the Marlin kernel's chunks of at most 128
// rows run at ~470 TFLOP/s on the H100 against cuBLAS's ~660 on the 16-bit
// weight (benchmarks/NOTES.md, session 23). No stripes, no K split and no
// cross-block reduction: with M >= 256 there are enough output tiles to
// fill the GPU, so each block owns one kTileM x kTileN tile of y and the
// whole of K.
//
// A block is a producer warpgroup, of which one thread issues every
// stage's copies (x by TMA, the weights' bands and group-scale rows by 1-D
// bulk copies, all completing on the stage's "full" mbarrier), and
// kConsumerWarpgroups consumer warpgroups. Each consumer warpgroup owns
// kSlabsPerWarpgroup 64-column slabs of W: per k16 block, warp w
// dequantizes its word of the slab's packed unit into a register A
// fragment (columns 16 w .. 16 w + 15 of the slab, as the Marlin kernel's
// wgmma tiles) and the warpgroup multiplies it by all kTileM rows of x^T
// with one wgmma.m64n128k16 (x^T from the stage by a 128-byte-swizzle
// descriptor). The accumulators stay in the wgmma registers for the whole
// of K; the stage ring is released stage by stage on "empty" mbarriers.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/marlin_layout.h"  // MarlinPerChannelScalePosition
#include "marlin_device.cuh"
#include "marlin_tiles.h"  // kWarpCols
#include "marlin_wgmma.cuh"
#include "stripe.cuh"  // align_shared

namespace jax_marlin::cuda {

template <int kConsumerWarpgroups_, int kSlabsPerWarpgroup_>
struct PrefillTile {
  static constexpr int kConsumerWarpgroups = kConsumerWarpgroups_;
  static constexpr int kSlabsPerWarpgroup = kSlabsPerWarpgroup_;
  // Rows of x a tile: the wgmma's n. Columns of K a stage: one TMA box of
  // x, a 128-byte row of the swizzled layout.
  static constexpr int kTileM = 128, kTileK = 64;
  static constexpr int kKBlocks = kTileK / 16;
  static constexpr int kSlabs = kConsumerWarpgroups * kSlabsPerWarpgroup;
  static constexpr int kTileN = kWarpCols * kSlabs;
  static constexpr int kConsumers = 128 * kConsumerWarpgroups;  // threads
  static constexpr int kThreads = kConsumers + 128;             // and the producer warpgroup
  // What resident_blocks_per_sm (launch_util.h) reads.
  static constexpr int kBlockThreads = kThreads, kBlocksPerSM = 1;
  // A stage, in bytes: x (kTileM rows of 128 bytes, 1024-byte swizzle
  // atoms), then the packed weights (a band of 16 rows of K is
  // kTileN * 8 bytes: each slab's 512-byte unit run), then up to two
  // group-scale rows (group 32 on a 64-deep stage).
  static constexpr int kXBytes = kTileM * kTileK * 2;
  static constexpr int kSlabBandBytes = 512;
  static constexpr int kBandBytes = kSlabs * kSlabBandBytes;
  static constexpr int kWBytes = kKBlocks * kBandBytes;
  static constexpr int kScaleRowBytes = kTileN * 2;
  static constexpr int kScaleRows = kTileK / 32;
  static constexpr int kStageBytes = (kXBytes + kWBytes + kScaleRows * kScaleRowBytes + 1023) / 1024 * 1024;
  // Hopper's 227 KiB a block, less the alignment slack.
  static constexpr int kStages = (220 * 1024) / kStageBytes < 8 ? (220 * 1024) / kStageBytes : 8;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;
  // The epilogue stages the tile of y through shared memory, rows padded
  // by 16 bytes so the fragments' 2-byte stores (4 rows x 16 bytes a warp)
  // fall into different banks, then writes whole 16-byte chunks of rows.
  static constexpr int kOutPitch = kTileN * 2 + 16;
  static_assert(kStages >= 3, "at least three stages");
  static_assert(kTileM * kOutPitch <= kStages * kStageBytes, "the epilogue reuses the stages");
  // Registers: the producers keep 40, the consumers share the rest
  // (consumer_registers: 104 a thread at 640 threads, 232 at 384).
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = consumer_registers<kConsumers, kProducerRegs>();
};

template <typename T>
struct PrefillParams {
  const char* packed;  // (k / 16, 2 n) int32, Marlin layout
  const T* scales;     // (k / group, n) permuted scales
  T* y;                // (rows, n)
  int rows, k, n;
  int group_shift;     // log2 of the group (grouped kernels only)
};

template <typename T, typename Tile, bool kGrouped>
__global__ void __launch_bounds__(Tile::kThreads, 1)
    prefill_kernel(const PrefillParams<T> p, const __grid_constant__ CUtensorMap x_map) {
#if JAX_MARLIN_HAS_WGMMA
  using T2 = typename Dtype<T>::T2;
  constexpr int kStages = Tile::kStages, kS = Tile::kSlabsPerWarpgroup;
  extern __shared__ int4 smem_raw[];
  int4* const smem_ptr = align_shared<1024>(smem_raw);
  const uint32_t smem = smem_addr(smem_ptr);
  // full[s]: the stage's copies have landed (one arrival, the producer's,
  // and the bytes). empty[s]: every consumer thread is done with it.
  // empty[kStages] is arrived on but never waited for: the first stage's
  // "release the previous one" goes there, so the loop needs no branch.
  __shared__ uint64_t full[kStages], empty[kStages + 1];
  const uint32_t full0 = smem_addr(full), empty0 = smem_addr(empty);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(full0 + 8 * s, 1);
    for (int s = 0; s <= kStages; ++s) mbarrier_init(empty0 + 8 * s, Tile::kConsumers);
    fence_mbarrier_init();
  }
  __syncthreads();
  const int m0 = blockIdx.x * Tile::kTileM, n0 = blockIdx.y * Tile::kTileN;
  const int k_tiles = p.k / Tile::kTileK;

  if (threadIdx.x >= Tile::kConsumers) {
    warpgroup_registers_dec<Tile::kProducerRegs>();
    if (threadIdx.x != Tile::kConsumers) return;
    // Band b of the tile: packed row b from column n0 (8 bytes a column).
    const size_t band_stride = size_t{8} * p.n;
    const char* bands = p.packed + size_t{8} * n0;
    const int scale_rows = kGrouped ? max(1, Tile::kTileK >> p.group_shift) : 0;
    const uint32_t stage_bytes = Tile::kXBytes + Tile::kWBytes + scale_rows * Tile::kScaleRowBytes;
    for (int kt = 0, s = 0; kt < k_tiles; ++kt) {
      // The stage's r-th refill waits for its (r - 1)-th release.
      if (kt >= kStages) mbarrier_wait(empty0 + 8 * s, (kt / kStages - 1) & 1);
      const uint32_t stage = smem + s * Tile::kStageBytes, bar = full0 + 8 * s;
      mbarrier_arrive_expect_tx(bar, stage_bytes);
      tma_load_2d(stage, &x_map, kt * Tile::kTileK, m0, bar);
#pragma unroll
      for (int b = 0; b < Tile::kKBlocks; ++b)
        bulk_copy(stage + Tile::kXBytes + b * Tile::kBandBytes,
                  bands + static_cast<size_t>(kt * Tile::kKBlocks + b) * band_stride, Tile::kBandBytes, bar);
      if constexpr (kGrouped) {
        const int row0 = (kt * Tile::kTileK) >> p.group_shift;
        for (int r = 0; r < scale_rows; ++r)
          bulk_copy(stage + Tile::kXBytes + Tile::kWBytes + r * Tile::kScaleRowBytes,
                    p.scales + static_cast<size_t>(row0 + r) * p.n + n0, Tile::kScaleRowBytes, bar);
      }
      s = s + 1 == kStages ? 0 : s + 1;
    }
    return;
  }

  warpgroup_registers_inc<Tile::kConsumerRegs>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first_slab = warp / 4 * kS, w = warp % 4;
  // This thread's word of its slabs' units (word w of lane's 16 bytes),
  // and its two columns' group-scale pair (16 w + g, 16 w + g + 8: the
  // scale permutation puts them in word w of 16-byte chunk g).
  const uint32_t w_read = Tile::kXBytes + first_slab * Tile::kSlabBandBytes + 16 * lane + 4 * w;
  const uint32_t s_read = Tile::kXBytes + Tile::kWBytes + first_slab * 128 + 16 * (lane / 4) + 4 * w;

  float d[kS][Tile::kTileM / 2];
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int r = 0; r < Tile::kTileM / 2; ++r) d[f][r] = 0.f;
  // Two fragment sets: block i is dequantized into set i % 2 while block
  // i - 1's wgmmas (set (i - 1) % 2) may still run; block i - 2's, which
  // read set i % 2, are waited for first (wgmma_wait<1>; trailing, also
  // across stages: block 0 after the previous stage's block 2).
  uint32_t afrag[kS][2][4];
  const auto dequantize = [&](uint32_t stage, int i) {
#pragma unroll
    for (int f = 0; f < kS; ++f) {
      const uint32_t word = ld_shared4(stage + w_read + i * Tile::kBandBytes + f * Tile::kSlabBandBytes);
      uint32_t b0[2], b1[2];
      Dtype<T>::dequant(word, b0, b1);
      if constexpr (kGrouped) {
        const int row = (16 * i) >> p.group_shift;  // the stage's first row is its first block's group
        const T2 s = as_t2<T2>(ld_shared4(stage + s_read + row * Tile::kScaleRowBytes + f * 128));
        scale_fragment<T>(b0, Dtype<T>::lo_pair(s));
        scale_fragment<T>(b1, Dtype<T>::hi_pair(s));
      }
      uint32_t(&a)[4] = afrag[f][i % 2];
      a[0] = b0[0], a[1] = b1[0], a[2] = b0[1], a[3] = b1[1];
    }
  };
  // Per-channel, each stage's last wgmmas trail into the next stage (a
  // warpgroup's wgmmas never drain between stages). With group scales
  // ptxas 13.0 serializes that form (C7514, though nothing but wgmmas
  // touches the accumulators; it does not with constant scales), so there
  // each stage ends waiting for its wgmmas, and the other consumer
  // warpgroups' wgmmas keep the tensor pipe busy meanwhile.
  constexpr bool kTrailing = !kGrouped;
  int s = 0, prev = kStages;  // prev: the stage to release (kStages: none yet)
  // K >= 64: at least one stage (a do-while: no path around the wgmmas).
  int kt = 0;
  do {
    const uint32_t stage = smem + s * Tile::kStageBytes;
    mbarrier_wait(full0 + 8 * s, (kt / kStages) & 1);
#pragma unroll
    for (int i = 0; i < Tile::kKBlocks; ++i) {
      if (kTrailing || i >= 2) wgmma_wait<1>();
      // Trailing, block 1's wait leaves only block 0 of this stage in
      // flight: every wgmma of the previous stage is done, and every
      // thread's release orders its own reads of it before the refill.
      if (kTrailing && i == 1) mbarrier_arrive(empty0 + 8 * prev);
      dequantize(stage, i);
      wgmma_fence();
      // k16 block i: 32 bytes into the 128-byte rows of x.
      const uint64_t desc = wgmma_descriptor_sw128(stage + 32 * i);
#pragma unroll
      for (int f = 0; f < kS; ++f) WgmmaRS<T, Tile::kTileM>::run(d[f], afrag[f][i % 2], desc);
      wgmma_commit();
    }
    if constexpr (!kTrailing) {
      wgmma_wait<0>();
      mbarrier_arrive(empty0 + 8 * s);
    }
    prev = s;
    s = s + 1 == kStages ? 0 : s + 1;
  } while (++kt < k_tiles);
  wgmma_wait<0>();
  // The wgmma asm writes d, but the wait does not name it: without this
  // fence the compiler would be free to read d (the epilogue's
  // conversions) before the wait.
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int r = 0; r < Tile::kTileM / 2; ++r) asm volatile("" : "+f"(d[f][r])::"memory");

  // Per-channel scales, in fp32 on the accumulators (as the Marlin
  // kernel's epilogue): the thread's columns 16 w + g and 16 w + g + 8.
  float scale[kS][2];
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (kGrouped) {
        scale[f][h] = 1.f;
      } else {
        const int col = n0 + (first_slab + f) * kWarpCols + 16 * w + lane / 4 + 8 * h;
        scale[f][h] = static_cast<float>(p.scales[MarlinPerChannelScalePosition(col)]);
      }
    }
  // Every consumer's wgmmas are done, so every stage is free: stage y.
  sync_first_threads<Tile::kConsumers>();
  char* const out = reinterpret_cast<char*>(smem_ptr);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int f = 0; f < kS; ++f) {
    const int col = (first_slab + f) * kWarpCols + 16 * w + g;
#pragma unroll
    for (int j = 0; j < Tile::kTileM / 8; ++j) {
      const int row = 8 * j + 2 * t;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = row + e % 2, c = col + 8 * (e / 2);
        *reinterpret_cast<T*>(out + r * Tile::kOutPitch + 2 * c) =
            static_cast<T>(d[f][4 * j + e] * scale[f][e / 2]);
      }
    }
  }
  sync_first_threads<Tile::kConsumers>();
  constexpr int kRowChunks = Tile::kTileN * 2 / 16;
  for (int idx = threadIdx.x; idx < Tile::kTileM * kRowChunks; idx += Tile::kConsumers) {
    const int r = idx / kRowChunks, c = idx % kRowChunks;
    if (m0 + r < p.rows)
      *reinterpret_cast<int4*>(p.y + static_cast<size_t>(m0 + r) * p.n + n0 + 8 * c) =
          *reinterpret_cast<const int4*>(out + r * Tile::kOutPitch + 16 * c);
  }
#else
  __trap();  // sm_90a only: never launched elsewhere
#endif
}

}  // namespace jax_marlin::cuda
