// The Marlin packing permutations (FORMAT.md), as index tables for host code
// that has to undo them. Built from the spec's recipe, not copied tables, so
// the one description in FORMAT.md stays the single source of truth.
#ifndef JAX_MARLIN_COMMON_MARLIN_LAYOUT_H_
#define JAX_MARLIN_COMMON_MARLIN_LAYOUT_H_

#include <array>
#include <cstdint>

namespace jax_marlin {

// One permutation run of packed weights: a band of 16 rows x 64 columns,
// 1024 4-bit codes in 128 int32 words.
inline constexpr int kRunRows = 16;
inline constexpr int kRunCols = 64;
inline constexpr int kRunValues = kRunRows * kRunCols;
inline constexpr int kRunWords = kRunValues / 8;

// P from FORMAT.md: packed value i of a run is tiled value P[i] (out[i] = in[P[i]]).
inline std::array<int16_t, kRunValues> MarlinWeightPerm() {
  std::array<int16_t, kRunValues> perm{};
  constexpr int kInterleave[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  int out = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int col = lane / 4;
    const int row0 = 2 * (lane % 4);
    const int rows[4] = {row0, row0 + 1, row0 + 8, row0 + 9};  // 2(t%4+4) = 2(t%4)+8
    int lane_idx[8];
    int n = 0;
    for (int block = 0; block < 2; ++block) {
      for (int r : rows) lane_idx[n++] = 16 * r + col + 8 * block;
    }
    for (int j = 0; j < 4; ++j) {
      for (int q = 0; q < 8; ++q) perm[out++] = static_cast<int16_t>(lane_idx[kInterleave[q]] + 256 * j);
    }
  }
  return perm;
}

// For each packed value i of a run, where its code lands in the row-major
// 16 x 64 band tile (row * 64 + column). The tiled order P[i] indexes is
// (16x16 tile t, row r, column c) = t*256 + r*16 + c, tile t covering
// columns 16t .. 16t+15.
inline std::array<int16_t, kRunValues> MarlinWeightUnpermute() {
  const std::array<int16_t, kRunValues> perm = MarlinWeightPerm();
  std::array<int16_t, kRunValues> dest{};
  for (int i = 0; i < kRunValues; ++i) {
    const int tile = perm[i] / 256, row = (perm[i] % 256) / 16, col = perm[i] % 16;
    dest[i] = static_cast<int16_t>(row * kRunCols + tile * 16 + col);
  }
  return dest;
}

// The same three maps in closed form, for device code (a table lookup per
// code would serialize on constant memory, and a table in global memory
// would need an upload per device). _ext.layout_closed_forms_match()
// compares each with the recipe above, entry by entry (tests/test_layout.py).
#if defined(__CUDACC__)
#define JAX_MARLIN_HOST_DEVICE __host__ __device__
#else
#define JAX_MARLIN_HOST_DEVICE
#endif

// MarlinWeightUnpermute()[8 * word + nibble]: word w of a run is lane w / 4's
// register w % 4 (16x16 tile w % 4 of the band); its nibbles interleave the
// lane's two 8-column blocks (even nibbles the first, odd the second) over
// the rows 2 (lane % 4) + {0, 1, 8, 9} of the mma fragment.
JAX_MARLIN_HOST_DEVICE inline int MarlinCodePosition(int word, int nibble) {
  const int lane = word / 4, tile = word % 4;
  const int n = 2 * (nibble % 4) + nibble / 4;  // kInterleave[nibble]
  const int block = n / 4, r = n % 4;
  const int row = 2 * (lane % 4) + (r & 1) + 8 * (r >> 1);
  const int col = 16 * tile + 8 * block + lane / 4;
  return row * kRunCols + col;
}

// MarlinGroupedScaleInverse()[b] and MarlinPerChannelScaleInverse()[b]:
// where natural column b of a run of scales is stored.
JAX_MARLIN_HOST_DEVICE inline int MarlinGroupedScaleSource(int b) { return 8 * (b % 8) + b / 8; }
JAX_MARLIN_HOST_DEVICE inline int MarlinPerChannelScaleSource(int b) {
  return 8 * ((b % 8) / 2) + 2 * (b / 8) + b % 2;
}
// Where natural column `col` of a layer sits in its permuted per-channel
// scale row (the permutation works in runs of 32).
JAX_MARLIN_HOST_DEVICE inline int MarlinPerChannelScalePosition(int col) {
  return col - col % 32 + MarlinPerChannelScaleSource(col % 32);
}

// Scale permutations (out[a] = in[perm[a]]) and their inverses
// (in[b] = out[inverse[b]]): grouped scales in runs of 64, per-channel in
// runs of 32.
inline std::array<int8_t, 64> MarlinGroupedScaleInverse() {
  std::array<int8_t, 64> inverse{};
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) inverse[i + 8 * j] = static_cast<int8_t>(8 * i + j);
  }
  return inverse;
}

inline std::array<int8_t, 32> MarlinPerChannelScaleInverse() {
  constexpr int kOffsets[8] = {0, 1, 8, 9, 16, 17, 24, 25};
  std::array<int8_t, 32> inverse{};
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 8; ++j) inverse[2 * i + kOffsets[j]] = static_cast<int8_t>(8 * i + j);
  }
  return inverse;
}

}  // namespace jax_marlin

#endif  // JAX_MARLIN_COMMON_MARLIN_LAYOUT_H_
