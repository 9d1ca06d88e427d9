// The 2:4 sparse 4-bit layout (docs/SPARSE_FORMAT.md, jax_marlin/sparse_layout.py)
// as index tables for host code that decodes it. Built from the same recipe
// as the Python module (lane -> mma.sp A fragment and metadata register), not
// copied tables; tests compare the CPU handler against the Python packer.
#ifndef JAX_MARLIN_COMMON_SPARSE_LAYOUT_H_
#define JAX_MARLIN_COMMON_SPARSE_LAYOUT_H_

#include <array>
#include <cstdint>

namespace jax_marlin {

// One run: a band of 32 input rows (one mma.sp k) x 64 output columns (four
// mma n-blocks of 16). Its 1024 kept codes (two per chunk of 4 rows and
// column) fill 128 value words; their 2-bit positions fill 64 metadata words.
inline constexpr int kSparseBandRows = 32;
inline constexpr int kSparseRunCols = 64;
inline constexpr int kSparseRunEntries = kSparseBandRows / 4 * kSparseRunCols * 2;  // 1024
inline constexpr int kSparseRunValueWords = kSparseRunEntries / 8;  // 128
inline constexpr int kSparseRunMetaWords = kSparseRunEntries / 16;  // 64

// Natural index of a kept entry: (chunk q of the band, column n of the run, kept e).
inline constexpr int SparseNatural(int q, int n, int e) { return (q * kSparseRunCols + n) * 2 + e; }

// For nibble i of a run's value words (word i / 8, nibble i % 8, lowest
// first): the natural index of the code it holds. Word 4 * lane + nb is
// lane's A fragment of mma n-block nb; fragment element f sits in nibble
// position kInterleave^-1(f) so that nibbles j, j + 4 make one half2.
inline std::array<int16_t, kSparseRunEntries> SparseValueNatural() {
  constexpr int kInterleave[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  std::array<int16_t, kSparseRunEntries> out{};
  int i = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int nb = 0; nb < 4; ++nb) {
      int element[8];
      for (int f = 0; f < 8; ++f) {
        const int row = g + 8 * ((f / 2) % 2), q = t + 4 * (f / 4);
        element[f] = SparseNatural(q, 16 * nb + row, f % 2);
      }
      for (int j = 0; j < 8; ++j) out[i++] = static_cast<int16_t>(element[kInterleave[j]]);
    }
  }
  return out;
}

// For 2-bit field i of a run's metadata words (word i / 16, bits 2(i%16)..):
// the natural index of the kept entry whose position it holds. Word
// 2 * lane + j serves mma n-block 2j + t/2 (t = lane % 4, sparsity selector
// t/2), chunks 4(t%2)..4(t%2)+3; bits [15:0] row g, [31:16] row g + 8.
inline std::array<int16_t, kSparseRunEntries> SparseMetaNatural() {
  std::array<int16_t, kSparseRunEntries> out{};
  int i = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 2; ++j) {
      const int nb = 2 * j + t / 2, h = t % 2;
      for (int f = 0; f < 16; ++f) {
        const int row = g + 8 * (f / 8), q = 4 * h + (f % 8) / 2;
        out[i++] = static_cast<int16_t>(SparseNatural(q, 16 * nb + row, f % 2));
      }
    }
  }
  return out;
}

}  // namespace jax_marlin

#endif  // JAX_MARLIN_COMMON_SPARSE_LAYOUT_H_
