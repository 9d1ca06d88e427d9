// SIMD kernels for AccumulateBandFn. The baseline build targets the oldest
// CPUs of the platform (SSE2 on x86-64), so on x86-64 an AVX2 copy is compiled
// too and picked at run time; wheels stay portable, fast CPUs stay fast.
//
// GCC/Clang vector extensions keep one source for every width: a block of
// 2 rows x 4 vectors of accumulators stays in registers across the tile's 16
// rows (8 registers; the plain loop re-loads and re-stores acc for every row
// of the tile, which makes it load/store bound).
#include "cpu/band_accumulate.h"

namespace jax_marlin {
namespace {

constexpr int kTileRows = 16;
constexpr int kTileCols = 64;

#if defined(__GNUC__)  // GCC and Clang

// Vector values never cross a function boundary here (helpers are always
// inlined into the kernels, each compiled for its own ISA), so GCC's note that
// passing 32-byte vectors without AVX changes the ABI does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float F32x4 __attribute__((vector_size(16)));
typedef float F32x8 __attribute__((vector_size(32)));

// Unaligned, alias-safe vector load/store (compile to single move
// instructions). A reduced-alignment typedef would not do: template arguments
// drop type attributes, and the compiler then emits aligned moves.
template <typename V>
__attribute__((always_inline)) inline V Load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
__attribute__((always_inline)) inline void Store(float* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

template <typename V, int kRows>
__attribute__((always_inline)) inline void Block(const float* x, const float* tile, float* acc) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int kVecs = 4;
  for (int c0 = 0; c0 < kTileCols; c0 += kLanes * kVecs) {
    V c[kRows][kVecs];
    for (int i = 0; i < kRows; ++i) {
      for (int j = 0; j < kVecs; ++j) c[i][j] = Load<V>(acc + i * kTileCols + c0 + j * kLanes);
    }
    for (int r = 0; r < kTileRows; ++r) {
      V w[kVecs];
      for (int j = 0; j < kVecs; ++j) w[j] = Load<V>(tile + r * kTileCols + c0 + j * kLanes);
      for (int i = 0; i < kRows; ++i) {
        const float xv = x[i * kTileRows + r];
        for (int j = 0; j < kVecs; ++j) c[i][j] += xv * w[j];
      }
    }
    for (int i = 0; i < kRows; ++i) {
      for (int j = 0; j < kVecs; ++j) Store<V>(acc + i * kTileCols + c0 + j * kLanes, c[i][j]);
    }
  }
}

template <typename V>
__attribute__((always_inline)) inline void Accumulate(const float* x, const float* tile, float* acc, int64_t rows) {
  int64_t m = 0;
  for (; m + 2 <= rows; m += 2) Block<V, 2>(x + m * kTileRows, tile, acc + m * kTileCols);
  if (m < rows) Block<V, 1>(x + m * kTileRows, tile, acc + m * kTileCols);
}

void AccumulateBaseline(const float* x, const float* tile, float* acc, int64_t rows) {
  Accumulate<F32x4>(x, tile, acc, rows);  // SSE2 / NEON registers
}

#if (defined(__x86_64__) || defined(__i386__)) && !defined(JAX_MARLIN_NO_AVX2)
#define JAX_MARLIN_HAVE_AVX2_KERNEL 1
// "avx2" only, not "fma": fused multiply-adds would round differently from
// the baseline kernel.
__attribute__((target("avx2"))) void AccumulateAvx2(const float* x, const float* tile, float* acc, int64_t rows) {
  Accumulate<F32x8>(x, tile, acc, rows);
}
#endif

#else  // other compilers: a plain loop the optimizer may vectorize

void AccumulateBaseline(const float* x, const float* tile, float* acc, int64_t rows) {
  for (int64_t m = 0; m < rows; ++m) {
    float* a = acc + m * kTileCols;
    for (int r = 0; r < kTileRows; ++r) {
      const float xv = x[m * kTileRows + r];
      for (int c = 0; c < kTileCols; ++c) a[c] += xv * tile[r * kTileCols + c];
    }
  }
}

#endif

}  // namespace

AccumulateBandFn SelectAccumulateBand() {
#ifdef JAX_MARLIN_HAVE_AVX2_KERNEL
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return AccumulateAvx2;
#endif
  return AccumulateBaseline;
}

}  // namespace jax_marlin
