// The prefill kernel (sm_90a): y = x W for many rows of x at once (prompt
// prefill, large batches), where the Marlin kernel's chunks of at most 128
// rows run at ~470 TFLOP/s on the H100 against cuBLAS's ~660 on the 16-bit
// weight (benchmarks/NOTES.md, session 23). No stripes: each block owns one
// kTileM x kTileN tile of y and the whole of K, or where the tiles are too
// few to fill the SMs (M of one or two tiles, N of a few thousand) one of
// `splits` equal shares of K; the splits of a tile store their fp32 parts
// in the workspace, and the last to finish sums them in split order
// (deterministic) and writes the tile.
//
// A block is a producer warpgroup, of which one thread issues every
// stage's copies (x by TMA, the weights' bands and group-scale rows by 1-D
// bulk copies, all completing on the stage's "full" mbarrier), and
// kConsumerWarpgroups consumer warpgroups. Each consumer warpgroup owns
// kSlabsPerWarpgroup 64-column slabs of W: per k16 block, warp w
// dequantizes its word of the slab's packed unit into a register A
// fragment (columns 16 w .. 16 w + 15 of the slab, as the Marlin kernel's
// wgmma tiles) and the warpgroup multiplies it by all kTileM rows of x^T
// with one wgmma.m64n{kTileM}k16 (x^T from the stage by a 128-byte-swizzle
// descriptor). The accumulators stay in the wgmma registers for the whole
// of K; the stage ring is released stage by stage on "empty" mbarriers.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/marlin_layout.h"  // MarlinPerChannelScalePosition, MarlinGroupedScaleSource
#include "marlin_device.cuh"
#include "marlin_tiles.h"  // kWarpCols
#include "marlin_wgmma.cuh"
#include "prefill_launch.h"  // kPrefillMaxSplits
#include "stripe.cuh"  // align_shared

namespace jax_marlin::cuda {

template <int kConsumerWarpgroups_, int kSlabsPerWarpgroup_, int kTileM_ = 128, bool kSparse_ = false>
struct PrefillTile {
  static constexpr int kConsumerWarpgroups = kConsumerWarpgroups_;
  static constexpr int kSlabsPerWarpgroup = kSlabsPerWarpgroup_;
  // 2:4 sparse weights (docs/SPARSE_FORMAT.md): a step of K is a 32-row
  // band (wgmma.mma_async.sp m64nNk32: half the values, half the tensor
  // work of the dense k32), with its metadata beside the values.
  static constexpr bool kSparse = kSparse_;
  // Rows of x a tile: the wgmma's n (64-row tiles waste no tensor work on
  // M of 64 or less). Columns of K a stage: one TMA box of x, a 128-byte
  // row of the swizzled layout.
  static constexpr int kTileM = kTileM_, kTileK = 64;
  static_assert(kTileM == 64 || kTileM == 128, "64 or 128 rows of x a tile");
  // Steps of K a stage: 16-row blocks (dense) or 32-row bands (2:4).
  static constexpr int kKStep = kSparse ? 32 : 16, kKSteps = kTileK / kKStep;
  static constexpr int kSlabs = kConsumerWarpgroups * kSlabsPerWarpgroup;
  static constexpr int kTileN = kWarpCols * kSlabs;
  static constexpr int kConsumers = 128 * kConsumerWarpgroups;  // threads
  static constexpr int kThreads = kConsumers + 128;             // and the producer warpgroup
  // What resident_blocks_per_sm (launch_util.h) reads.
  static constexpr int kBlockThreads = kThreads, kBlocksPerSM = 1;
  // A stage, in bytes: x (kTileM rows of 128 bytes, 1024-byte swizzle
  // atoms), then the packed weights (a step's row is kTileN * 8 bytes:
  // each slab's 512-byte unit run; for 2:4 the kept values), then the 2:4
  // metadata (a band's row kTileN * 4 bytes: 256 a slab), then up to two
  // group-scale rows (group 32 on a 64-deep stage).
  static constexpr int kXBytes = kTileM * kTileK * 2;
  static constexpr int kSlabBandBytes = 512;
  static constexpr int kBandBytes = kSlabs * kSlabBandBytes;
  static constexpr int kWBytes = kKSteps * kBandBytes;
  static constexpr int kSlabMetaBytes = kSparse ? 256 : 0;
  static constexpr int kMetaBandBytes = kSlabs * kSlabMetaBytes;
  static constexpr int kScaleOffset = kXBytes + kWBytes + kKSteps * kMetaBandBytes;
  static constexpr int kScaleRowBytes = kTileN * 2;
  static constexpr int kScaleRows = kTileK / 32;
  static constexpr int kStageBytes = (kScaleOffset + kScaleRows * kScaleRowBytes + 1023) / 1024 * 1024;
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
  // A split's part of the tile in the workspace, in float4s: each consumer
  // thread stores its accumulators as kSlabsPerWarpgroup x kTileM / 8
  // float4s, thread-fastest (coalesced, and read back by the same thread).
  static constexpr int kPartUnits = kTileM * kTileN / 4;
  // Whether the K split is compiled in: not with two slabs a warpgroup,
  // whose 128 accumulators a thread leave no registers for summing the
  // parts (a spill, ptxas 13.0); that shape is the bench's alone anyway.
  static constexpr bool kSplits = kSlabsPerWarpgroup == 1;
};

template <typename T>
struct PrefillParams {
  const char* packed;  // (k / 16, 2 n) int32, Marlin layout; 2:4: (k / 32, 2 n) kept values
  const char* meta;    // 2:4: (k / 32, n) int32 positions
  const T* scales;     // (k / group, n) permuted scales
  T* y;                // (rows, n)
  int rows, k, n;
  int group_shift;     // log2 of the group (grouped kernels only)
  // K split (gridDim.z = splits): block z takes k-tiles [z k_tiles / splits,
  // (z + 1) k_tiles / splits). With splits > 1, `parts` holds
  // tiles x splits x kPartUnits float4s (any contents) and `counters` a
  // zeroed int a tile (left zeroed).
  int splits;
  float4* parts;
  int* counters;
};

// With the K split: stores this block's accumulators as its split's part
// of the tile, and returns false, except in the last of the tile's splits
// to finish, which replaces d by the sum of all the parts in split order
// (so the bits do not depend on which split finishes last) and returns
// true. Consumer threads only (the producer warpgroup has left).
template <typename Tile, int kMaxSplits, int kS, int kRegs>
__device__ __forceinline__ bool sum_split_parts(float (&d)[kS][kRegs], float4* parts, int* counters, int splits,
                                                int split) {
  constexpr int kChunks = kRegs / 4;
  const int tile = blockIdx.y * gridDim.x + blockIdx.x;
  float4* const tile_parts = parts + static_cast<size_t>(tile) * splits * Tile::kPartUnits + threadIdx.x;
  const auto at = [&](int z, int f, int j) {
    return tile_parts + z * Tile::kPartUnits + (f * kChunks + j) * Tile::kConsumers;
  };
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int j = 0; j < kChunks; ++j)
      __stcg(at(split, f, j), make_float4(d[f][4 * j], d[f][4 * j + 1], d[f][4 * j + 2], d[f][4 * j + 3]));
  if (!last_to_arrive<Tile::kConsumers>(counters + tile, splits)) return false;
  // The part of split 0, then each later one added, kBatch float4s a
  // thread at a time (more would spill beside d on the 104-register
  // consumers of the 4x1 tile); unrolled, so later batches' loads can go
  // out before earlier batches' adds. __ldcg: the parts are in L2, never a
  // stale L1 line.
  constexpr int kUnits = kS * kChunks, kBatch = 4;
  static_assert(kUnits % kBatch == 0, "whole batches");
  // Unrolled over the most splits: d loop-carried through a rolled loop
  // spilled (ptxas 13.0).
#pragma unroll
  for (int z = 0; z < kMaxSplits; ++z) {
    if (z == splits) break;
    // One pointer a part, the fragments at constant offsets from it.
    const float4* const part_z = at(z, 0, 0);
    const bool first = z == 0;
#pragma unroll
    for (int u0 = 0; u0 < kUnits; u0 += kBatch) {
      float4 part[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) part[b] = __ldcg(part_z + (u0 + b) * Tile::kConsumers);
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        float* const out = &d[(u0 + b) / kChunks][4 * ((u0 + b) % kChunks)];
        if (first) {
          out[0] = part[b].x, out[1] = part[b].y, out[2] = part[b].z, out[3] = part[b].w;
        } else {
          out[0] += part[b].x, out[1] += part[b].y, out[2] += part[b].z, out[3] += part[b].w;
        }
      }
    }
  }
  return true;
}

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
  // This block's share of K: k-tiles [kt0, kt0 + count), count >= 1.
  const int k_tiles = p.k / Tile::kTileK, split = blockIdx.z;
  const int kt0 = split * k_tiles / p.splits, count = (split + 1) * k_tiles / p.splits - kt0;

  if (threadIdx.x >= Tile::kConsumers) {
    warpgroup_registers_dec<Tile::kProducerRegs>();
    if (threadIdx.x != Tile::kConsumers) return;
    // Step b of the tile: packed row b from column n0 (8 bytes a column;
    // 2:4: its metadata row too, 4 bytes a column).
    const size_t band_stride = size_t{8} * p.n, meta_stride = size_t{4} * p.n;
    const char* bands = p.packed + size_t{8} * n0;
    const char* metas = Tile::kSparse ? p.meta + size_t{4} * n0 : nullptr;
    const int scale_rows = kGrouped ? max(1, Tile::kTileK >> p.group_shift) : 0;
    const uint32_t stage_bytes = Tile::kScaleOffset + scale_rows * Tile::kScaleRowBytes;
    for (int i = 0, s = 0; i < count; ++i) {
      const int kt = kt0 + i;
      // The stage's r-th refill waits for its (r - 1)-th release.
      if (i >= kStages) mbarrier_wait(empty0 + 8 * s, (i / kStages - 1) & 1);
      const uint32_t stage = smem + s * Tile::kStageBytes, bar = full0 + 8 * s;
      mbarrier_arrive_expect_tx(bar, stage_bytes);
      tma_load_2d(stage, &x_map, kt * Tile::kTileK, m0, bar);
#pragma unroll
      for (int b = 0; b < Tile::kKSteps; ++b) {
        const size_t row = static_cast<size_t>(kt) * Tile::kKSteps + b;
        bulk_copy(stage + Tile::kXBytes + b * Tile::kBandBytes, bands + row * band_stride, Tile::kBandBytes, bar);
        if constexpr (Tile::kSparse)
          bulk_copy(stage + Tile::kXBytes + Tile::kWBytes + b * Tile::kMetaBandBytes, metas + row * meta_stride,
                    Tile::kMetaBandBytes, bar);
      }
      if constexpr (kGrouped) {
        const int row0 = (kt * Tile::kTileK) >> p.group_shift;
        for (int r = 0; r < scale_rows; ++r)
          bulk_copy(stage + Tile::kScaleOffset + r * Tile::kScaleRowBytes,
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
  const uint32_t s_read = Tile::kScaleOffset + first_slab * 128 + 16 * (lane / 4) + 4 * w;
  // 2:4: this warp's metadata word, n-block w's, which the format gives to
  // lanes t = 2 (w % 2), + 1 of each group of four (word w / 2, selector
  // w % 2). The warpgroup's wgmma takes one selector for all four warps,
  // so every warp uses selector 0 and a lane of an odd warp reads lane
  // t ^ 2's word (as the 2:4 kernel's wgmma tiles, sparse_kernel.cuh).
  const uint32_t m_read =
      Tile::kXBytes + Tile::kWBytes + first_slab * Tile::kSlabMetaBytes + 8 * (lane ^ (2 * (w % 2))) + 4 * (w / 2);

  float d[kS][Tile::kTileM / 2];
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int r = 0; r < Tile::kTileM / 2; ++r) d[f][r] = 0.f;
  // Two fragment sets: block i is dequantized into set i % 2 while block
  // i - 1's wgmmas (set (i - 1) % 2) may still run; block i - 2's, which
  // read set i % 2, are waited for first (wgmma_wait<1>; trailing, also
  // across stages: block 0 after the previous stage's block 2).
  uint32_t afrag[kS][2][4], meta[kS][2];
  const auto dequantize = [&](uint32_t stage, int i) {
#pragma unroll
    for (int f = 0; f < kS; ++f) {
      const uint32_t word = ld_shared4(stage + w_read + i * Tile::kBandBytes + f * Tile::kSlabBandBytes);
      uint32_t b0[2], b1[2];
      Dtype<T>::dequant(word, b0, b1);
      uint32_t(&a)[4] = afrag[f][i % 2];
      if constexpr (Tile::kSparse) {
        // The mma.sp A fragment is b0, b1 in order; n-row g (a0, a2) takes
        // the lo scale, n-row g + 8 (a1, a3) the hi one.
        meta[f][i % 2] = ld_shared4(stage + m_read + i * Tile::kMetaBandBytes + f * Tile::kSlabMetaBytes);
        a[0] = b0[0], a[1] = b0[1], a[2] = b1[0], a[3] = b1[1];
        if constexpr (kGrouped) {
          const int row = (32 * i) >> p.group_shift;  // the stage's first row is its first band's group
          const T2 s = as_t2<T2>(ld_shared4(stage + s_read + row * Tile::kScaleRowBytes + f * 128));
          scale_sparse_fragment<T>(a, s);
        }
      } else {
        if constexpr (kGrouped) {
          const int row = (16 * i) >> p.group_shift;  // the stage's first row is its first block's group
          const T2 s = as_t2<T2>(ld_shared4(stage + s_read + row * Tile::kScaleRowBytes + f * 128));
          scale_fragment<T>(b0, Dtype<T>::lo_pair(s));
          scale_fragment<T>(b1, Dtype<T>::hi_pair(s));
        }
        a[0] = b0[0], a[1] = b1[0], a[2] = b0[1], a[3] = b1[1];
      }
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
  // At least one stage (a do-while: no path around the wgmmas).
  int it = 0;
  do {
    const uint32_t stage = smem + s * Tile::kStageBytes;
    mbarrier_wait(full0 + 8 * s, (it / kStages) & 1);
#pragma unroll
    for (int i = 0; i < Tile::kKSteps; ++i) {
      if (kTrailing || i >= 2) wgmma_wait<1>();
      // Trailing, block 1's wait leaves only block 0 of this stage in
      // flight: every wgmma of the previous stage is done, and every
      // thread's release orders its own reads of it before the refill.
      if (kTrailing && i == 1) mbarrier_arrive(empty0 + 8 * prev);
      dequantize(stage, i);
      wgmma_fence();
      // Step i: 2 kKStep bytes into the 128-byte rows of x.
      const uint64_t desc = wgmma_descriptor_sw128(stage + 2 * Tile::kKStep * i);
#pragma unroll
      for (int f = 0; f < kS; ++f) {
        if constexpr (Tile::kSparse) {
          WgmmaSpRS<T, Tile::kTileM>::template run<0>(d[f], afrag[f][i % 2], meta[f][i % 2], desc);
        } else {
          WgmmaRS<T, Tile::kTileM>::run(d[f], afrag[f][i % 2], desc);
        }
      }
      wgmma_commit();
    }
    if constexpr (!kTrailing) {
      wgmma_wait<0>();
      mbarrier_arrive(empty0 + 8 * s);
    }
    prev = s;
    s = s + 1 == kStages ? 0 : s + 1;
  } while (++it < count);
  wgmma_wait<0>();
  // The wgmma asm writes d, but the wait does not name it: without this
  // fence the compiler would be free to read d (the epilogue's
  // conversions) before the wait.
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int r = 0; r < Tile::kTileM / 2; ++r) asm volatile("" : "+f"(d[f][r])::"memory");
  if constexpr (Tile::kSplits) {
    if (p.splits > 1 && !sum_split_parts<Tile, kPrefillMaxSplits>(d, p.parts, p.counters, p.splits, split)) return;
  }

  // Per-channel scales, in fp32 on the accumulators (as the Marlin
  // kernel's epilogue): the thread's columns 16 w + g and 16 w + g + 8.
  float scale[kS][2];
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (kGrouped) {
        scale[f][h] = 1.f;
      } else if constexpr (Tile::kSparse) {
        // The 2:4 format keeps per-channel scales in the grouped order too.
        const int run0 = n0 + (first_slab + f) * kWarpCols;
        scale[f][h] = static_cast<float>(p.scales[run0 + MarlinGroupedScaleSource(16 * w + lane / 4 + 8 * h)]);
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
