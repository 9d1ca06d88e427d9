// CPU Marlin matmul: the portable reference backend (and the one CI tests),
// for the dense layout (FORMAT.md) and the 2:4 sparse one
// (docs/SPARSE_FORMAT.md): both decode one band of rows into a dense fp32
// tile and share everything else.
//
// Work is split into 64-column chunks of N, the width of one Marlin
// permutation run. For each chunk we walk K in 16-row bands: the band's 128
// packed words are decoded into a dequantized fp32 16 x 64 tile, and every row
// of x accumulates against it. Tiles are never materialized for the whole
// weight, so memory stays O(M * 64) per thread; chunks are independent, so
// threads split them with no synchronization.
//
// Numerics match the pure reference exactly up to summation order:
// W_hat = (code - 8) * s is rounded to the activation dtype before use,
// products and sums are fp32, y is rounded once at the end.
#include "cpu/marlin_cpu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "common/float16.h"
#include "common/marlin_layout.h"
#include "common/marlin_shape.h"
#include "common/sparse_layout.h"
#include "cpu/band_accumulate.h"

namespace ffi = xla::ffi;

namespace jax_marlin {
namespace {

// Rows of x handled per pass: bounds the fp32 copy of x (kMBlock * K floats)
// and each thread's accumulator (kMBlock * 64 floats) while keeping enough
// rows per decoded tile to amortize the decode.
constexpr int64_t kMBlock = 256;
// Multiply-adds a thread should get for starting it to pay off (a fraction
// of a millisecond of work against tens of microseconds to start a thread).
constexpr int64_t kWorkPerThread = int64_t{1} << 22;
// The decode of a band costs about as much as this many rows of x.
constexpr int64_t kDecodeCostRows = 4;
constexpr int kMaxThreads = 32;

struct LayoutTables {
  std::array<int16_t, kRunValues> weight_dest = MarlinWeightUnpermute();
  std::array<int8_t, 64> grouped_scale_inverse = MarlinGroupedScaleInverse();
  std::array<int8_t, 32> per_channel_scale_inverse = MarlinPerChannelScaleInverse();
  std::array<int16_t, kSparseRunEntries> sparse_value_natural = SparseValueNatural();
  std::array<int16_t, kSparseRunEntries> sparse_meta_natural = SparseMetaNatural();
};

const LayoutTables& Tables() {
  static const LayoutTables tables;  // built once, thread-safe (C++11 statics)
  return tables;
}

inline float ToFloat(uint16_t bits, bool bf16) { return bf16 ? Bf16ToFloat(bits) : HalfToFloat(bits); }
inline uint16_t FromFloat(float v, bool bf16) { return bf16 ? FloatToBf16(v) : FloatToHalf(v); }

struct Problem {
  MarlinShape shape;
  bool bf16 = false;
  bool sparse = false;  // 2:4 sparse layout: packed = values, plus meta
  const uint16_t* x = nullptr;
  const uint32_t* packed = nullptr;
  const uint32_t* meta = nullptr;
  uint16_t* y = nullptr;
  std::vector<float> scales;  // (G, N), un-permuted, fp32
};

// Undo the Marlin scale permutation: scales arrive in kernel order. The
// sparse layout keeps the grouped order for per-channel scales too.
std::vector<float> UnpermuteScales(const uint16_t* permuted, const MarlinShape& s, bool bf16,
                                   bool channel_order) {
  const LayoutTables& t = Tables();
  const int run = channel_order ? 32 : 64;
  const int8_t* inverse =
      channel_order ? t.per_channel_scale_inverse.data() : t.grouped_scale_inverse.data();
  std::vector<float> out(static_cast<size_t>(s.groups * s.n));
  for (int64_t base = 0; base < s.groups * s.n; base += run) {  // N % 64 == 0: runs stay in a row
    for (int b = 0; b < run; ++b) out[base + b] = ToFloat(permuted[base + inverse[b]], bf16);
  }
  return out;
}

// lut[code * 64 + col] = W_hat for code 0..15 and the 64 scales of one group
// and chunk: (code - 8) * s rounded to the activation dtype, as the reference
// computes it. Only 4 of the 16 values need a rounding conversion:
// multiplying by 0 or a power of two is exact in fp32 (it can only overflow
// the dtype), and rounding to nearest even is symmetric in sign.
void BuildDequantTable(const float* scales, bool bf16, float* lut) {
  // bf16 shares fp32's exponent range, so an exact fp32 product is already a
  // bf16; fp16 overflows past 65504.
  auto exact = [bf16](float e) {
    return !bf16 && std::fabs(e) > 65504.0f ? std::copysign(INFINITY, e) : e;
  };
  for (int col = 0; col < kRunCols; ++col) {
    const float sc = scales[col];
    float* value = lut + 8 * kRunCols + col;  // value[v * 64] = W_hat of v = code - 8
    value[0] = 0.0f * sc;
    for (int v : {1, 2, 4}) {
      value[v * kRunCols] = exact(static_cast<float>(v) * sc);
      value[-v * kRunCols] = exact(static_cast<float>(-v) * sc);
    }
    value[-8 * kRunCols] = exact(-8.0f * sc);
    for (int v : {3, 5, 6, 7}) {
      const float rounded = ToFloat(FromFloat(static_cast<float>(v) * sc, bf16), bf16);
      value[v * kRunCols] = rounded;
      value[-v * kRunCols] = -rounded;
    }
  }
}

// Dense layout: the band's 128 packed words -> the 16 x 64 tile. Packed value
// i (word i/8, nibble i%8, lowest first) goes to tile position dest[i].
void DecodeDenseBand(const uint32_t* words, const float* lut, float* tile) noexcept {
  const int16_t* dest = Tables().weight_dest.data();
  for (int w = 0; w < kRunWords; ++w) {
    uint32_t word = words[w];
    for (int v = 0; v < 8; ++v, word >>= 4) {
      const int d = dest[w * 8 + v];
      tile[d] = lut[(word & 15u) * kRunCols + (d & (kRunCols - 1))];
    }
  }
}

// Sparse layout: a run's 64 metadata words give each kept entry's row in its
// chunk of 4; its 128 value words give the codes. Fills the 32 x 64 tile
// (pruned entries 0).
void DecodeSparseBand(const uint32_t* values, const uint32_t* meta, const float* lut,
                      float* tile) noexcept {
  const LayoutTables& t = Tables();
  std::fill(tile, tile + kSparseBandRows * kSparseRunCols, 0.0f);
  uint8_t position[kSparseRunEntries];
  for (int w = 0; w < kSparseRunMetaWords; ++w) {
    uint32_t word = meta[w];
    for (int f = 0; f < 16; ++f, word >>= 2) position[t.sparse_meta_natural[w * 16 + f]] = word & 3u;
  }
  for (int w = 0; w < kSparseRunValueWords; ++w) {
    uint32_t word = values[w];
    for (int v = 0; v < 8; ++v, word >>= 4) {
      const int natural = t.sparse_value_natural[w * 8 + v];
      const int col = (natural / 2) % kSparseRunCols, chunk = natural / (2 * kSparseRunCols);
      const int row = 4 * chunk + position[natural];
      tile[row * kSparseRunCols + col] = lut[(word & 15u) * kRunCols + col];
    }
  }
}

// Columns [chunk_begin, chunk_end) (in 64-wide chunks) of rows [m0, m0 + mb)
// of y. xb holds those rows of x in fp32, band-major: xb[(band*mb + m)*16 + r];
// acc is scratch for mb * 64 floats. Allocates nothing, so it cannot throw
// (it runs on worker threads, where an exception would terminate).
void RunChunks(const Problem& p, const float* xb, int64_t m0, int64_t mb, int64_t chunk_begin,
               int64_t chunk_end, float* acc) noexcept {
  const MarlinShape& s = p.shape;
  // A band is what one decode fills: 16 rows (dense) or 32 (sparse), as
  // 16-row tiles for the accumulate kernel.
  const int64_t band_rows = p.sparse ? kSparseBandRows : kRunRows;
  const int64_t tiles_per_band = band_rows / kRunRows;
  const int64_t bands = s.k / band_rows;
  const int64_t words_per_band = 2 * s.n;

  const AccumulateBandFn accumulate = SelectAccumulateBand();
  alignas(64) float tile[kSparseBandRows * kRunCols];
  alignas(64) float lut[16 * kRunCols];  // lut[code*64 + col] = W_hat for this group & chunk

  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    std::fill(acc, acc + mb * kRunCols, 0.0f);
    int64_t lut_group = -1;
    for (int64_t band = 0; band < bands; ++band) {
      const int64_t group = band * band_rows / s.group_size;  // a band never spans groups
      if (group != lut_group) {
        BuildDequantTable(p.scales.data() + group * s.n + chunk * kRunCols, p.bf16, lut);
        lut_group = group;
      }

      const uint32_t* words = p.packed + band * words_per_band + chunk * kRunWords;
      if (p.sparse) {
        DecodeSparseBand(words, p.meta + band * s.n + chunk * kSparseRunMetaWords, lut, tile);
      } else {
        DecodeDenseBand(words, lut, tile);
      }
      for (int64_t h = 0; h < tiles_per_band; ++h) {
        accumulate(xb + (band * tiles_per_band + h) * mb * kRunRows, tile + h * kRunValues, acc, mb);
      }
    }

    for (int64_t m = 0; m < mb; ++m) {
      uint16_t* yr = p.y + (m0 + m) * s.n + chunk * kRunCols;
      const float* a = acc + m * kRunCols;
      for (int col = 0; col < kRunCols; ++col) yr[col] = FromFloat(a[col], p.bf16);
    }
  }
}

// CPUs this process may run on (respects taskset/cpusets, unlike
// hardware_concurrency alone); JAX_MARLIN_CPU_THREADS overrides.
int MaxThreads() {
  static const int max_threads = [] {
    if (const char* env = std::getenv("JAX_MARLIN_CPU_THREADS")) {
      const int n = std::atoi(env);
      if (n > 0) return std::min(n, kMaxThreads);
    }
    int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
    return std::clamp(n, 1, kMaxThreads);
  }();
  return max_threads;
}

void RunBlock(const Problem& p, const float* xb, int64_t m0, int64_t mb) {
  const MarlinShape& s = p.shape;
  const int64_t chunks = s.n / kRunCols;
  const int64_t work = (mb + kDecodeCostRows) * s.k * s.n;
  const int64_t want = std::max<int64_t>(1, work / kWorkPerThread);
  const int threads = static_cast<int>(std::min<int64_t>({want, chunks, MaxThreads()}));

  // All allocation happens here, before any thread starts, so a bad_alloc
  // can't leave joinable threads behind.
  std::vector<float> acc(static_cast<size_t>(threads * mb * kRunCols));
  std::vector<std::thread> pool;
  pool.reserve(threads);
  int64_t begin = 0;
  for (int t = 0; t < threads; ++t) {
    const int64_t end = chunks * (t + 1) / threads;
    float* scratch = acc.data() + t * mb * kRunCols;
    bool ran_here = t == threads - 1;  // the calling thread takes the last share
    if (!ran_here) {
      try {
        pool.emplace_back(RunChunks, std::cref(p), xb, m0, mb, begin, end, scratch);
      } catch (const std::exception&) {  // no thread to be had: do it here
        ran_here = true;
      }
    }
    if (ran_here) RunChunks(p, xb, m0, mb, begin, end, scratch);
    begin = end;
  }
  for (std::thread& th : pool) th.join();
}

void MarlinMatmul(Problem& p) {
  const MarlinShape& s = p.shape;
  const int64_t bands = s.k / kRunRows;
  const int64_t blocks = (s.m + kMBlock - 1) / kMBlock;
  std::vector<float> xb;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    // Even block sizes (e.g. 300 rows -> 150 + 150, not 256 + 44).
    const int64_t m0 = s.m * blk / blocks, mb = s.m * (blk + 1) / blocks - m0;
    xb.resize(static_cast<size_t>(mb * s.k));
    for (int64_t m = 0; m < mb; ++m) {
      const uint16_t* xr = p.x + (m0 + m) * s.k;
      for (int64_t band = 0; band < bands; ++band) {
        float* dst = xb.data() + (band * mb + m) * kRunRows;
        for (int r = 0; r < kRunRows; ++r) dst[r] = ToFloat(xr[band * kRunRows + r], p.bf16);
      }
    }
    RunBlock(p, xb.data(), m0, mb);
  }
}

ffi::Error MarlinMatmulCpuImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> packed,
                               ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y) {
  Problem p;
  ffi::Error status = CheckMarlinOperands(
      x.element_type(), x.dimensions(), packed.element_type(), packed.dimensions(),
      scales.element_type(), scales.dimensions(), y->element_type(), y->dimensions(), &p.shape);
  if (status.failure()) return status;
  if (p.shape.m == 0) return ffi::Error::Success();

  p.bf16 = p.shape.dtype == ffi::DataType::BF16;
  p.x = static_cast<const uint16_t*>(x.untyped_data());
  p.packed = reinterpret_cast<const uint32_t*>(packed.typed_data());
  p.y = static_cast<uint16_t*>(y->untyped_data());
  try {
    p.scales = UnpermuteScales(static_cast<const uint16_t*>(scales.untyped_data()), p.shape, p.bf16,
                               p.shape.per_channel);
    MarlinMatmul(p);
  } catch (const std::exception& e) {  // never let C++ exceptions cross the C ABI
    return ffi::Error::Internal(std::string("jax_marlin_matmul (cpu): ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error SparseMatmulCpuImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> values,
                               ffi::Buffer<ffi::S32> meta, ffi::AnyBuffer scales,
                               ffi::Result<ffi::AnyBuffer> y) {
  Problem p;
  ffi::Error status = CheckSparseOperands(
      x.element_type(), x.dimensions(), values.element_type(), values.dimensions(),
      meta.element_type(), meta.dimensions(), scales.element_type(), scales.dimensions(),
      y->element_type(), y->dimensions(), &p.shape);
  if (status.failure()) return status;
  if (p.shape.m == 0) return ffi::Error::Success();

  p.bf16 = p.shape.dtype == ffi::DataType::BF16;
  p.sparse = true;
  p.x = static_cast<const uint16_t*>(x.untyped_data());
  p.packed = reinterpret_cast<const uint32_t*>(values.typed_data());
  p.meta = reinterpret_cast<const uint32_t*>(meta.typed_data());
  p.y = static_cast<uint16_t*>(y->untyped_data());
  try {
    p.scales = UnpermuteScales(static_cast<const uint16_t*>(scales.untyped_data()), p.shape, p.bf16,
                               /*channel_order=*/false);
    MarlinMatmul(p);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jax_marlin_sparse_matmul (cpu): ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_marlin

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinMatmulCpu, jax_marlin::MarlinMatmulCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()        // x (M, K)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // packed (K/16, 2N)
                                  .Arg<ffi::AnyBuffer>()        // scales (G, N), permuted
                                  .Ret<ffi::AnyBuffer>());      // y (M, N)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseMatmulCpu, jax_marlin::SparseMatmulCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()        // x (M, K)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // values (K/32, 2N)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // meta (K/32, N)
                                  .Arg<ffi::AnyBuffer>()        // scales (G, N), permuted
                                  .Ret<ffi::AnyBuffer>());      // y (M, N)
