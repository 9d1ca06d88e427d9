// Probe of the Hopper wgmma facts a warpgroup Marlin kernel would rest on,
// checked against a host reference before any kernel depends on them:
//  - A from registers: warp w of the warpgroup holds rows 16 w .. 16 w + 15
//    of the 64 x 16 A tile in the mma.m16n8k16 A-fragment layout (so the
//    dequantized W^T fragments of the current kernel can feed wgmma as is);
//  - B (16 x N, K-major) from shared memory in the no-swizzle canonical
//    layout of 8 x 16-byte core matrices, described by a matrix descriptor
//    whose two byte offsets are tried both ways round;
//  - the D fragment: per 8 columns, the m16n8 accumulator layout.
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a tests/cuda/wgmma_probe.cu -o wgmma_probe
//   ./wgmma_probe        (prints one PASS/FAIL line per case; exit 1 if none passes for some N)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda_test_util.h"

namespace {

__device__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Matrix descriptor, no swizzle: start address, leading- and stride-dimension
// byte offsets (all in 16-byte units), layout type 0 in bits 62-63.
__device__ uint64_t make_descriptor(uint32_t smem, uint32_t leading_bytes, uint32_t stride_bytes) {
  return (static_cast<uint64_t>((smem >> 4) & 0x3fff)) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3fff) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3fff) << 32);
}

template <int N>
struct Wgmma;

// D (64 x N, fp32, N / 2 registers a thread) += A (registers) * B (descriptor).
template <>
struct Wgmma<8> {
  static __device__ void run(float (&d)[4], const uint32_t (&a)[4], uint64_t b) {
    // scale-d is a predicate (accumulate); then scale-a, scale-b, transpose-b.
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
  }
};
template <>
struct Wgmma<16> {
  static __device__ void run(float (&d)[8], const uint32_t (&a)[4], uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
  }
};

// One warpgroup: D = A B with A (64 x 16) and B^T = x (N x 16) row-major in
// global memory. `k_major_leading`: the descriptor's leading offset is the
// distance between the two K-adjacent core matrices (else the N-adjacent).
template <int N>
__global__ void probe_kernel(const half* a, const half* x, float* d, bool k_major_leading) {
  // Core matrix (nb, kc) = rows 8 nb .. 8 nb + 7 of x, columns 8 kc .. 8 kc + 7:
  // 128 contiguous bytes at nb * 128 + kc * (N / 8) * 128.
  __shared__ __align__(128) half tile[N * 16];
  const int tid = threadIdx.x;
  for (int e = tid; e < N * 16; e += blockDim.x) {
    const int row = e / 16, col = e % 16;
    const int nb = row / 8, kc = col / 8;
    tile[(kc * (N / 8) + nb) * 64 + (row % 8) * 8 + col % 8] = x[e];
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();

  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  auto pair = [&](int row, int col) {
    const half2 v = __halves2half2(a[row * 16 + col], a[row * 16 + col + 1]);
    return *reinterpret_cast<const uint32_t*>(&v);
  };
  const int r0 = 16 * warp + g;
  const uint32_t frag[4] = {pair(r0, 2 * t), pair(r0 + 8, 2 * t), pair(r0, 2 * t + 8),
                            pair(r0 + 8, 2 * t + 8)};

  const uint32_t k_step = (N / 8) * 128, n_step = 128;
  const uint64_t desc = k_major_leading
                            ? make_descriptor(shared_address(tile), k_step, n_step)
                            : make_descriptor(shared_address(tile), n_step, k_step);
  float acc[N / 2];
  for (float& v : acc) v = 0.f;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  Wgmma<N>::run(acc, frag, desc);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");

  for (int i = 0; i < N / 8; ++i) {
    d[r0 * N + 8 * i + 2 * t] = acc[4 * i];
    d[r0 * N + 8 * i + 2 * t + 1] = acc[4 * i + 1];
    d[(r0 + 8) * N + 8 * i + 2 * t] = acc[4 * i + 2];
    d[(r0 + 8) * N + 8 * i + 2 * t + 1] = acc[4 * i + 3];
  }
}

template <int N>
bool check(bool k_major_leading) {
  std::vector<half> a(64 * 16), x(N * 16);
  std::vector<float> af(a.size()), xf(x.size());
  for (size_t i = 0; i < a.size(); ++i) af[i] = static_cast<float>((i * 7 + 3) % 13) - 6.f;
  for (size_t i = 0; i < x.size(); ++i) xf[i] = static_cast<float>((i * 5 + 1) % 11) - 5.f;
  for (size_t i = 0; i < a.size(); ++i) a[i] = __float2half(af[i]);
  for (size_t i = 0; i < x.size(); ++i) x[i] = __float2half(xf[i]);
  half *da, *dx;
  float* dd;
  CHECK_CUDA(cudaMalloc(&da, a.size() * 2));
  CHECK_CUDA(cudaMalloc(&dx, x.size() * 2));
  CHECK_CUDA(cudaMalloc(&dd, 64 * N * 4));
  CHECK_CUDA(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(dd, 0, 64 * N * 4));
  probe_kernel<N><<<1, 128>>>(da, dx, dd, k_major_leading);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> d(64 * N);
  CHECK_CUDA(cudaMemcpy(d.data(), dd, d.size() * 4, cudaMemcpyDeviceToHost));
  double worst = 0;
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < N; ++c) {
      double ref = 0;
      for (int k = 0; k < 16; ++k) ref += af[r * 16 + k] * xf[c * 16 + k];
      worst = std::max(worst, std::fabs(ref - d[r * N + c]));
    }
  cudaFree(da), cudaFree(dx), cudaFree(dd);
  const bool ok = worst == 0;  // small integers: the product is exact
  std::printf("N=%-3d leading offset = %s core step: %s (max abs diff %.1f)\n", N,
              k_major_leading ? "K" : "N", ok ? "PASS" : "FAIL", worst);
  return ok;
}

}  // namespace

int main() {
  bool ok8 = false, ok16 = false;
  for (bool k_leading : {true, false}) {
    ok8 |= check<8>(k_leading);
    ok16 |= check<16>(k_leading);
  }
  return ok8 && ok16 ? 0 : 1;
}
