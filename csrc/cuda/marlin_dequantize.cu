// The Marlin weight dequantized to a row-major 16-bit (K, N) matrix: the
// first half of the large-M dense path (dequantize, then XLA's GEMM), which
// XLA's own fusion of the same arithmetic ran at ~65% of the copy bandwidth
// (H100, 8192 x 57344: 606 us for 1.17 GB; benchmarks/dense_path_probe.py).
//
// One block takes one 16-row band of K and up to kRunsPerBlock runs of 64
// columns: it reads the runs' packed words (contiguous, 512 bytes a run),
// writes each code's (code - 8) * scale into a shared 16 x 512 tile at the
// position the layout gives it (marlin_layout.h), then stores the tile's
// rows as whole 16-byte units. Bit-identical to jax_marlin.dequantize:
// (code - 8) * s is exact in fp32 and rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/marlin_layout.h"
#include "cuda/launch_util.h"
#include "cuda/marlin_device.cuh"  // Dtype: the 16-bit conversions
#include "cuda/marlin_launch.h"

namespace jax_marlin::cuda {
namespace {

constexpr int kRunsPerBlock = 8;
constexpr int kBlockCols = kRunsPerBlock * kRunCols;  // 512
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint32_t* __restrict__ packed, const T* __restrict__ scales,
                      T* __restrict__ w, int n, int group_shift, bool per_channel) {
  __shared__ float scale[kBlockCols];
  __shared__ __align__(16) T tile[kRunRows][kBlockCols];
  const int band = blockIdx.y;
  const int col0 = blockIdx.x * kBlockCols;
  const int runs = min(kRunsPerBlock, (n - col0) / kRunCols);
  const int cols = runs * kRunCols;

  // The band's scales in natural column order (a band lies in one group:
  // groups are at least 32 rows).
  const T* srow = scales + (per_channel ? 0 : static_cast<size_t>((band * kRunRows) >> group_shift) * n);
  for (int c = threadIdx.x; c < cols; c += kThreads) {
    const int b = c % kRunCols, run_base = col0 + c - b;
    const int src = per_channel ? (b / 32) * 32 + MarlinPerChannelScaleSource(b % 32)
                                : MarlinGroupedScaleSource(b);
    const T s = srow[run_base + src];
    scale[c] = Dtype<T>::to_floats(typename Dtype<T>::T2(s, s)).x;
  }
  __syncthreads();

  // Packed row `band` holds 2 n words: run r's 128 words at 128 r. A thread
  // always takes the same word of a run (kThreads is a multiple of the run's
  // words), so where its 8 codes land is worked out once.
  static_assert(kThreads % kRunWords == 0, "a thread keeps its word index from run to run");
  const int word_index = threadIdx.x % kRunWords;
  int row_of[8], col_of[8];
#pragma unroll
  for (int nibble = 0; nibble < 8; ++nibble) {
    const int pos = MarlinCodePosition(word_index, nibble);
    row_of[nibble] = pos / kRunCols;
    col_of[nibble] = pos % kRunCols;
  }
  const uint32_t* words = packed + static_cast<size_t>(band) * 2 * n + 2 * col0;
  for (int run = threadIdx.x / kRunWords; run < runs; run += kThreads / kRunWords) {
    uint32_t word = __ldg(words + run * kRunWords + word_index);
#pragma unroll
    for (int nibble = 0; nibble < 8; ++nibble, word >>= 4) {
      const int col = run * kRunCols + col_of[nibble];
      const float code = static_cast<float>(static_cast<int>(word & 15u) - 8);
      const float v = code * scale[col];
      tile[row_of[nibble]][col] = Dtype<T>::from_floats(v, v).x;
    }
  }
  __syncthreads();

  // Rows of the tile as 16-byte units (8 values): cols is a multiple of 64.
  const int units_per_row = cols / 8;
  for (int u = threadIdx.x; u < kRunRows * units_per_row; u += kThreads) {
    const int row = u / units_per_row, unit = u % units_per_row;
    const int4 v = *reinterpret_cast<const int4*>(&tile[row][8 * unit]);
    *reinterpret_cast<int4*>(w + static_cast<size_t>(band * kRunRows + row) * n + col0 + 8 * unit) = v;
  }
}

}  // namespace

cudaError_t marlin_dequantize(const DequantizeProblem& pr, cudaStream_t stream) {
  if (pr.k == 0 || pr.n == 0) return cudaSuccess;
  const dim3 grid((pr.n + kBlockCols - 1) / kBlockCols, pr.k / kRunRows);
  const bool per_channel = pr.group_size == pr.k;
  const int group_shift = per_channel ? 0 : log2_exact(pr.group_size);
  const auto* packed = static_cast<const uint32_t*>(pr.packed);
  if (pr.dtype == ActDtype::kBFloat16) {
    dequantize_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        packed, static_cast<const __nv_bfloat16*>(pr.scales), static_cast<__nv_bfloat16*>(pr.w), pr.n,
        group_shift, per_channel);
  } else {
    dequantize_kernel<half><<<grid, kThreads, 0, stream>>>(
        packed, static_cast<const half*>(pr.scales), static_cast<half*>(pr.w), pr.n, group_shift,
        per_channel);
  }
  return cudaGetLastError();
}

}  // namespace jax_marlin::cuda
