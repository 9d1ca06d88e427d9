// The Marlin kernel: y[M, N] = x[M, K] @ dequant(packed)[K, N] for M <= 64.
//
// Work decomposition ("striped"): the output is cut into column tiles of
// kTileN columns, the reduction into k-tiles of kTileK rows. The
// (n-tile, k-tile) iterations, k fastest, are dealt out to the blocks as
// contiguous stripes of near-equal length, one block per SM. A stripe may end
// in the middle of one n-tile and continue into the next, so several blocks
// can share an n-tile; they add their partial sums in a fixed order through an fp32
// workspace, taking turns on a per-tile lock, and the last one writes y.
// Every block streams its weights through one cp.async pipeline that runs
// across n-tile boundaries, so a block never drains its loads mid-stripe.
#pragma once

#include <cuda_runtime.h>

#include "marlin_device.cuh"
#include "marlin_tiles.h"

namespace jax_marlin::cuda {

template <typename T>
struct MarlinParams {
  const T* x;            // (rows, K) activations of this chunk
  const int4* packed;    // (K / 16, 2 N) int32 Marlin layout, as 16-byte units
  const T* scales;       // (K / group, N) permuted scales
  T* y;                  // (rows, N)
  float* workspace;      // >= kTileM * N floats of partial sums
  int* locks;            // N / kTileN zeroed counters
  int rows, k, n;        // rows <= kTileM
  int group_shift;       // log2(group size); grouped kernels only
  int stripes;           // gridDim.x
};

// Which block's stripe holds iteration `it`, when `total` iterations are dealt
// into `stripes` stripes starting at floor(b * total / stripes).
__device__ __forceinline__ int stripe_of(int it, int total, int stripes) {
  return static_cast<int>(((static_cast<long long>(it) + 1) * stripes + total - 1) / total) - 1;
}

template <typename T, typename Tile>
class MarlinBlock {
  using T2 = typename Dtype<T>::T2;
  // m-blocks this warp owns: kMB of them, from m_block0_.
  static constexpr int kMB = Tile::kMBlocksPerWarp;

 public:
  __device__ MarlinBlock(const MarlinParams<T>& p, int4* smem)
      : p_(p),
        smem_(smem),
        red_(smem + Tile::kStages * Tile::kStage),
        warp_(threadIdx.x / 32),
        lane_(threadIdx.x % 32),
        warp_n_(warp_ % Tile::kWarpsN),
        warp_mn_(warp_ % Tile::kWarpsMN),
        warp_k_(warp_ / Tile::kWarpsMN),
        m_block0_(warp_ / Tile::kWarpsN % Tile::kWarpsM * Tile::kMBlocksPerWarp),
        k_tiles_(p.k / Tile::kTileK),
        n_tiles_(p.n / Tile::kTileN),
        evict_first_(make_evict_first_policy()) {}

  __device__ void run() {
    const int total = k_tiles_ * n_tiles_;
    const int begin = static_cast<int>(static_cast<long long>(blockIdx.x) * total / p_.stripes);
    const int end = static_cast<int>(static_cast<long long>(blockIdx.x + 1) * total / p_.stripes);
    const int count = end - begin;

    // Two cursors walk the stripe: one kStages - 1 iterations ahead issuing
    // loads, one consuming. Stepped, not recomputed: no divisions per tile.
    Cursor load{begin / k_tiles_, begin % k_tiles_};
    Cursor use = load;

    // Prologue: fill all but one stage. Every iteration commits exactly one
    // group (possibly empty) so that wait_group<kStages - 2> always means
    // "the stage about to be consumed has landed".
#pragma unroll
    for (int s = 0; s < Tile::kStages - 1; ++s) {
      if (s < count) {
        load_stage(s, load);
        load.step(k_tiles_);
      }
      cp_async_commit();
    }

    zero_accumulators();
    int read_slot = 0, write_slot = Tile::kStages - 1;
    for (int i = 0; i < count; ++i) {
      cp_async_wait<Tile::kStages - 2>();
      // Also guarantees every warp is done with the slot refilled below.
      __syncthreads();
      if (i + Tile::kStages - 1 < count) {
        load_stage(write_slot, load);
        load.step(k_tiles_);
      }
      cp_async_commit();

      compute_stage(read_slot);
      if (use.k_tile == k_tiles_ - 1 || i == count - 1) {
        finish_tile(use.n_tile, total);
        zero_accumulators();
      }
      use.step(k_tiles_);
      read_slot = read_slot == Tile::kStages - 1 ? 0 : read_slot + 1;
      write_slot = write_slot == Tile::kStages - 1 ? 0 : write_slot + 1;
    }
    cp_async_wait<0>();
  }

 private:
  // Position in the (n-tile, k-tile) iteration space, k fastest.
  struct Cursor {
    int n_tile, k_tile;
    __device__ void step(int k_tiles) {
      if (++k_tile == k_tiles) {
        k_tile = 0;
        ++n_tile;
      }
    }
  };

  __device__ int4* stage_a(int slot) const { return smem_ + slot * Tile::kStage; }
  __device__ int4* stage_b(int slot) const { return stage_a(slot) + Tile::kAStage; }
  __device__ int4* stage_s(int slot) const { return stage_b(slot) + Tile::kBStage; }

  // Activation tiles are stored with their 16-byte chunks XOR-swizzled by row
  // (chunk ^ row % 8): the 8 rows one ldmatrix phase reads then fall into 8
  // different bank groups instead of one.
  __device__ static int a_offset(int row, int chunk) {
    return row * Tile::kAChunksPerRow + (chunk ^ (row & 7));
  }

  __device__ void load_stage(int slot, Cursor at) {
    const int n_tile = at.n_tile, k_tile = at.k_tile;
    const int tid = threadIdx.x;

    // Activations: kTileM rows x kTileK columns; rows past M are zero-filled.
    int4* a_dst = stage_a(slot);
    const int4* a_src = reinterpret_cast<const int4*>(p_.x + k_tile * Tile::kTileK);
    const int a_row_stride = p_.k / 8;
#pragma unroll
    for (int c0 = 0; c0 < Tile::kAStage; c0 += Tile::kThreads) {
      const int c = c0 + tid;
      if (Tile::kAStage % Tile::kThreads == 0 || c < Tile::kAStage) {
        const int row = c / Tile::kAChunksPerRow, chunk = c % Tile::kAChunksPerRow;
        const bool valid = row < p_.rows;
        cp_async16_zfill(a_dst + a_offset(row, chunk), a_src + (valid ? row : 0) * a_row_stride + chunk,
                         valid);
      }
    }

    // Weights: kKBlocks rows of the packed array, kWarpsN * 32 16-byte units
    // each, contiguous in global memory and copied as they are.
    int4* b_dst = stage_b(slot);
    const int b_row_stride = p_.n / 2;  // 2 N int32 = N / 2 int4 per packed row
    const int4* b_src = p_.packed + static_cast<size_t>(k_tile) * Tile::kKBlocks * b_row_stride +
                        n_tile * Tile::kWarpsN * 32;
    constexpr int kBRow = Tile::kWarpsN * 32;
#pragma unroll
    for (int c0 = 0; c0 < Tile::kBStage; c0 += Tile::kThreads) {
      const int c = c0 + tid;
      if (Tile::kBStage % Tile::kThreads == 0 || c < Tile::kBStage) {
        cp_async16_stream(b_dst + c, b_src + (c / kBRow) * b_row_stride + c % kBRow, evict_first_);
      }
    }

    // Scales: the group rows this k-tile touches (one when a group spans
    // several k-tiles).
    if constexpr (Tile::kGrouped) {
      const int k0 = k_tile * Tile::kTileK;
      const int first_row = k0 >> p_.group_shift;
      const int rows = max(1, Tile::kTileK >> p_.group_shift);
      constexpr int kRowChunks = Tile::kTileN / 8;
      if (tid < rows * kRowChunks) {
        const int r = tid / kRowChunks, chunk = tid % kRowChunks;
        const T* src = p_.scales + static_cast<size_t>(first_row + r) * p_.n + n_tile * Tile::kTileN;
        cp_async16(stage_s(slot) + r * kRowChunks + chunk, reinterpret_cast<const int4*>(src) + chunk);
      }
    }
  }

  __device__ void compute_stage(int slot) {
    if constexpr (Tile::kLoadsOnly) return;
    const int4* a = stage_a(slot);
    const int4* b = stage_b(slot);
    // With 3-4 m-blocks the accumulators fill most of the register file:
    // keep the sub-blocks sequential so their fragments are not all live.
#pragma unroll(kMB > 2 ? 1 : Tile::kKBlocksPerWarp)
    for (int i = 0; i < Tile::kKBlocksPerWarp; ++i) {
      const int kb = warp_k_ * Tile::kKBlocksPerWarp + i;
      // One 16-byte load: this lane's packed words for the warp's 4 n16 tiles.
      const int4 q = b[(kb * Tile::kWarpsN + warp_n_) * 32 + lane_];

      // Group scales for the warp's 8 n8 sub-tiles: the scale permutation puts
      // columns c, c+8, ..., c+56 (c = lane / 4) in 16 consecutive bytes.
      int4 s_raw = make_int4(0, 0, 0, 0);
      if constexpr (Tile::kGrouped) {
        const int s_row = (kb * 16) >> p_.group_shift;
        const int4* s = stage_s(slot);
        s_raw = s[(s_row * Tile::kTileN + warp_n_ * kWarpCols) / 8 + lane_ / 4];
      }

      uint32_t afrag[kMB][4];
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        const int row = (m_block0_ + mb) * 16 + lane_ % 16;
        ldmatrix_x4(afrag[mb], a + a_offset(row, kb * 2 + lane_ / 16));
      }

      const uint32_t words[4] = {static_cast<uint32_t>(q.x), static_cast<uint32_t>(q.y),
                                 static_cast<uint32_t>(q.z), static_cast<uint32_t>(q.w)};
      const uint32_t scale_words[4] = {static_cast<uint32_t>(s_raw.x), static_cast<uint32_t>(s_raw.y),
                                       static_cast<uint32_t>(s_raw.z), static_cast<uint32_t>(s_raw.w)};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b0[2], b1[2];
        Dtype<T>::dequant(words[j], b0, b1);
        if constexpr (Tile::kGrouped) {
          const T2 s = as_t2<T2>(scale_words[j]);
          scale_fragment<T>(b0, Dtype<T>::lo_pair(s));
          scale_fragment<T>(b1, Dtype<T>::hi_pair(s));
        }
#pragma unroll
        for (int mb = 0; mb < kMB; ++mb) {
          MmaOp<T>::run(afrag[mb], b0, acc_[mb][2 * j]);
          MmaOp<T>::run(afrag[mb], b1, acc_[mb][2 * j + 1]);
        }
      }
    }
  }

  __device__ void zero_accumulators() {
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_[mb][j][e] = 0.f;
  }

  // Sum the K-split warps' accumulators into the warps with warp_k_ == 0,
  // halving the number of live partial sums per round.
  __device__ void reduce_within_block() {
    if constexpr (Tile::kWarpsK > 1) {
      float4* red = reinterpret_cast<float4*>(red_);
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int half = Tile::kWarpsK / 2; half >= 1; half /= 2) {
          // Slot layout [slot][j][lane]: each warp touches 512 contiguous bytes
          // per j, so the float4 accesses are bank-conflict free.
          if (warp_k_ >= half && warp_k_ < 2 * half) {
            const int slot = (warp_k_ - half) * Tile::kWarpsMN + warp_mn_;
#pragma unroll
            for (int j = 0; j < 8; ++j)
              red[(slot * 8 + j) * 32 + lane_] =
                  make_float4(acc_[mb][j][0], acc_[mb][j][1], acc_[mb][j][2], acc_[mb][j][3]);
          }
          __syncthreads();
          if (warp_k_ < half) {
            const int slot = warp_k_ * Tile::kWarpsMN + warp_mn_;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const float4 v = red[(slot * 8 + j) * 32 + lane_];
              acc_[mb][j][0] += v.x;
              acc_[mb][j][1] += v.y;
              acc_[mb][j][2] += v.z;
              acc_[mb][j][3] += v.w;
            }
          }
          __syncthreads();
        }
      }
    }
  }

  // End of this block's share of n-tile `n_tile`: reduce over the block's K
  // split, then over the blocks sharing the tile (through the workspace), and
  // let the last of them write the output.
  //
  // Turn order runs from the highest block index down. The highest block met
  // this tile at the start of its stripe, the lowest meets it at the end of
  // its own: in that order nobody waits on a block that is itself still
  // waiting, so waits never chain across stripes. (Ascending order would make
  // each block wait, after its first tile, for the whole stripe before it.)
  // The order is fixed, so results are deterministic.
  __device__ void finish_tile(int n_tile, int total) {
    reduce_within_block();

    const int first = stripe_of(n_tile * k_tiles_, total, p_.stripes);
    const int last = stripe_of((n_tile + 1) * k_tiles_ - 1, total, p_.stripes);
    const int turn = last - static_cast<int>(blockIdx.x);
    const bool owner = warp_k_ == 0;
    // Partial sums kept in fragment order: each lane reads back exactly what
    // it wrote, as coalesced float4s.
    float4* ws = reinterpret_cast<float4*>(p_.workspace) +
                 static_cast<size_t>(n_tile) * (Tile::kTileM * Tile::kTileN / 4);
    int* lock = p_.locks + n_tile;

    if (first != last) {
      if (turn > 0) {
        wait_for_turn(lock, turn);
        // The final writer is the last to look at this lock: leave it at 0,
        // so that a persistent lock buffer needs zeroing only once.
        if (static_cast<int>(blockIdx.x) == first && threadIdx.x == 0) *lock = 0;
        if (owner) {
#pragma unroll
          for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const float4 v = __ldcg(&ws[workspace_index(mb, j)]);
              acc_[mb][j][0] += v.x;
              acc_[mb][j][1] += v.y;
              acc_[mb][j][2] += v.z;
              acc_[mb][j][3] += v.w;
            }
        }
      }
      if (static_cast<int>(blockIdx.x) != first) {
        if (owner) {
#pragma unroll
          for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
            for (int j = 0; j < 8; ++j)
              __stcg(&ws[workspace_index(mb, j)],
                     make_float4(acc_[mb][j][0], acc_[mb][j][1], acc_[mb][j][2], acc_[mb][j][3]));
        }
        pass_turn(lock, turn + 1);
        return;
      }
    }
    if (owner) write_output(n_tile);
  }

  __device__ int workspace_index(int mb, int j) const {
    return (((m_block0_ + mb) * 8 + j) * Tile::kWarpsN + warp_n_) * 32 + lane_;
  }

  // Accumulator layout of m16n8: lane holds rows lane/4 and lane/4 + 8,
  // columns 2 * (lane % 4) + {0, 1} of each n8 sub-tile.
  __device__ void write_output(int n_tile) {
    const int col0 = n_tile * Tile::kTileN + warp_n_ * kWarpCols;
    // The warp's 64 columns as two runs of 32 (four n8 sub-tiles each): the
    // per-channel scale permutation puts the 8 scales a lane needs from a run
    // in 16 consecutive bytes. Per-channel scales are applied here, in fp32.
#pragma unroll
    for (int run = 0; run < 2; ++run) {
      uint32_t scale_words[4] = {0, 0, 0, 0};
      if constexpr (!Tile::kGrouped) {
        const int4 raw =
            *reinterpret_cast<const int4*>(p_.scales + col0 + run * 32 + 8 * (lane_ % 4));
        scale_words[0] = raw.x, scale_words[1] = raw.y, scale_words[2] = raw.z, scale_words[3] = raw.w;
      }
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = (m_block0_ + mb) * 16 + lane_ / 4 + 8 * half;
          if (row >= p_.rows) continue;
          T* out = p_.y + static_cast<size_t>(row) * p_.n + col0 + 2 * (lane_ % 4);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = run * 4 + e;
            float v0 = acc_[mb][j][2 * half], v1 = acc_[mb][j][2 * half + 1];
            if constexpr (!Tile::kGrouped) {
              const float2 s = Dtype<T>::to_floats(as_t2<T2>(scale_words[e]));
              v0 *= s.x;
              v1 *= s.y;
            }
            *reinterpret_cast<T2*>(out + 8 * j) = Dtype<T>::from_floats(v0, v1);
          }
        }
      }
    }
  }

  const MarlinParams<T> p_;
  int4* smem_;
  int4* red_;
  const int warp_, lane_, warp_n_, warp_mn_, warp_k_, m_block0_;
  const int k_tiles_, n_tiles_;
  const uint64_t evict_first_;
  float acc_[kMB][8][4];
};

template <typename T, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, Tile::kBlocksPerSM)
    marlin_kernel(const MarlinParams<T> p) {
  extern __shared__ int4 smem[];
  MarlinBlock<T, Tile> block(p, smem);
  block.run();
}

}  // namespace jax_marlin::cuda
