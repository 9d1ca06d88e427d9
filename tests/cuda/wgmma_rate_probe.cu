// Tensor-core-bound rate of Hopper wgmma in the form the Marlin wgmma tiles issue it: A (the dequantized
// W^T) from registers, B (= x^T, K-major) from shared memory by a 128-byte-swizzle descriptor, fp16 in,
// fp32 accumulators; dense m64nNk16 (WgmmaRS) and 2:4 sparse m64nNk32 (WgmmaSpRS, selector 0). Every
// warpgroup issues the same wgmma back to back, nothing else, in groups of kGroup between a fence and a
// commit + wait (as compute_stage_wgmma). Per N (= the batch M), 1 or 2 warpgroups an SM (one block
// an SM: ~150 KB of dynamic shared memory, as the real tiles), and four issue forms:
//   sets=1 wait<0>: one accumulator chain, every group waited for (the real kernel);
//   sets=2:         two independent accumulator sets alternated (does the dependency limit the rate?);
//   wait<1>:        one group left in flight across the wait (does the drain at the wait cost?).
// Then the MMA time of the 70B layers at the rate of the real kernel's form, next to their weight-read
// time. MACs of a sparse wgmma are counted with the dense-equivalent K (64 N 32; "real": half).
//
//   scripts/build_tools.sh . OUT "" wgmma_rate      (sm_90a; -> OUT/wgmma_rate_probe)
//   OUT/wgmma_rate_probe                            (no arguments; a few s on an H100; exit 0 off cc 9.0)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/marlin_wgmma.cuh"
#include "cuda_test_util.h"

namespace {
using namespace jax_marlin::cuda;

constexpr int kGroup = 8;                 // wgmmas between wgmma_fence and wgmma_commit
constexpr int kSmemBytes = 150 * 1024;    // as the real tiles: one block an SM, whatever its size
constexpr int kMaxThreads = 2 * 128;      // two warpgroups (the launch picks 1 or 2)
constexpr uint32_t kMeta = 0xe4e4e4e4u;   // 2:4 metadata: nibbles (0, 1) and (2, 3), both valid
template <int N>
constexpr int kWgmmas = (1 << 21) / N;    // per warpgroup: ~1-2 M SM clocks a launch at any N

// m64n256: not among marlin_wgmma.cuh's shapes (no tile has 256 rows of x); the same asm with 128
// accumulators a thread. D (N / 2 registers), A (4), B descriptor; sparse: metadata, selector 0.
#define RATE_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define RATE_D16(i) RATE_D4(i), RATE_D4(i + 4), RATE_D4(i + 8), RATE_D4(i + 12)
#define RATE_D64(i) RATE_D16(i), RATE_D16(i + 16), RATE_D16(i + 32), RATE_D16(i + 48)
#define RATE_OPERANDS_256                                                                                    \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, "         \
  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "          \
  "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "          \
  "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "          \
  "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, "          \
  "%97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "            \
  "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "              \
  "{%128, %129, %130, %131}, %132"

// One wgmma of shape N: dense m64nNk16 or sparse m64nNk32, fp16, D += A B. Traps where not compiled for
// sm_90a (JAX_MARLIN_HAS_WGMMA), as the wrappers do; main() runs nothing off compute capability 9.0.
template <int N, bool kSparse>
__device__ __forceinline__ void mma(float (&d)[N / 2], const uint32_t (&a)[4], uint32_t e, uint64_t b) {
  if constexpr (N == 256 && !JAX_MARLIN_HAS_WGMMA) {
    __trap();
  } else if constexpr (N == 256 && kSparse) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16 " RATE_OPERANDS_256
                 ", %133, 0, p, 1, 1, 0;\n}\n"
                 : RATE_D64(0), RATE_D64(64)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e));
  } else if constexpr (N == 256) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " RATE_OPERANDS_256 ", p, 1, 1, 0;\n}\n"
                 : RATE_D64(0), RATE_D64(64)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
  } else if constexpr (kSparse) {
    WgmmaSpRS<half, N>::template run<0>(d, a, e, b);
  } else {
    WgmmaRS<half, N>::run(d, a, b);
  }
}

// A small normal fp16 value from an index: +-(1 .. 16) / 256, no zero, NaN or denormal (tensor-core power,
// hence clock, depends on the data: all-zero operands would flatter the rate).
__device__ float small_value(uint32_t i) {
  const uint32_t h = i * 2654435761u;
  return ((h >> 28) + 1) * ((h >> 27) & 1 ? 1.f : -1.f) / 256.f;
}

// Each warpgroup: groups x kGroup wgmmas of shape N into kSets accumulator sets (alternated), at most
// kPending committed groups left in flight at each wait. cycles[block]: the SM clocks of the loop.
template <int N, bool kSparse, int kSets, int kPending>
__global__ void __launch_bounds__(kMaxThreads, 1) rate_kernel(int groups, float* sink, long long* cycles) {
  extern __shared__ uint8_t smem[];
  // B: N rows of 128 bytes (64 k), 1024-byte aligned (the swizzle atom); every wgmma reads all N rows.
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t base = (raw + 1023) & ~1023u;
  half* b = reinterpret_cast<half*>(smem + (base - raw));
  for (int i = threadIdx.x; i < N * 64; i += blockDim.x) b[i] = __float2half(small_value(i));
  fence_proxy_async();
  __syncthreads();

  uint32_t a[4];
  for (int r = 0; r < 4; ++r) {
    const uint32_t i = 8 * threadIdx.x + 2 * r;
    const half2 v = __floats2half2_rn(small_value(i), small_value(i + 1));
    a[r] = *reinterpret_cast<const uint32_t*>(&v);
  }
  // The k steps of one swizzled 128-byte row: 4 of k16 (32 bytes), or 2 of k32 (64 bytes) sparse.
  constexpr int kStepBytes = kSparse ? 64 : 32, kSteps = 128 / kStepBytes;
  // Opaque to the compiler: computed once here, not rematerialized between the wgmmas of the loop.
  uint64_t desc[kSteps];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    desc[s] = wgmma_descriptor_sw128(base + s * kStepBytes);
    asm volatile("" : "+l"(desc[s]));
  }
  float d[kSets][N / 2];
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[s][i] = 0.f;

  const long long start = clock64();
#pragma unroll 1
  for (int g = 0; g < groups; ++g) {
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kGroup; ++j) mma<N, kSparse>(d[j % kSets], a, kMeta, desc[j % kSteps]);
    wgmma_commit();
    wgmma_wait<kPending>();
  }
  wgmma_wait<0>();
  // The accumulators are read only after that wait: without this compiler fence the first add of the
  // sum below moves above it, into the wgmmas' pipeline stage, and ptxas serializes them all (C7514).
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) asm volatile("" : "+f"(d[s][i])::"memory");
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
  float sum = 0.f;  // keeps the accumulators live (and the result looked at)
#pragma unroll
  for (int s = 0; s < kSets; ++s)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) sum += d[s][i];
  sink[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

struct Device {
  int sms;
  double clock_hz;  // cudaDevAttrClockRate: the nominal maximum SM clock
  float* sink;
  long long* cycles;
};

// MACs an SM per second (dense-equivalent) of the real kernel's form (sets=1, wait<0>, 2 warpgroups),
// by sparse and N, for the layer estimate.
std::vector<std::pair<int, double>> real_form_rate[2];

template <int N, bool kSparse, int kSets, int kPending>
void measure(const Device& dev, int warpgroups) {
  auto* kernel = rate_kernel<N, kSparse, kSets, kPending>;
  CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const float us = median_us_per_call(
      [&](int, cudaStream_t stream) {
        kernel<<<dev.sms, 128 * warpgroups, kSmemBytes, stream>>>(kWgmmas<N> / kGroup, dev.sink, dev.cycles);
        CHECK_CUDA(cudaGetLastError());
      },
      1, 5);
  std::vector<long long> cycles(dev.sms);  // of the last launch
  CHECK_CUDA(cudaMemcpy(cycles.data(), dev.cycles, dev.sms * sizeof(long long), cudaMemcpyDeviceToHost));
  double mean_cycles = 0;
  for (long long c : cycles) mean_cycles += static_cast<double>(c) / dev.sms;
  const double macs = static_cast<double>(warpgroups) * kWgmmas<N> * 64 * N * (kSparse ? 32 : 16);  // per SM
  const double nominal = macs / (us * 1e-6 * dev.clock_hz);
  std::printf("%-6s %4d %3d %4d %6d %9.1f %9.0f %9.0f %8.0f %8.0f %8.1f\n", kSparse ? "2:4" : "dense", N,
              warpgroups, kSets, kPending, us, nominal, kSparse ? nominal / 2 : nominal, macs / mean_cycles,
              mean_cycles / us, 2 * macs * dev.sms / (us * 1e6));
  if (kSets == 1 && kPending == 0 && warpgroups == 2)
    real_form_rate[kSparse].push_back({N, macs / (us * 1e-6)});
}

template <int N>
void measure_n(const Device& dev) {
  for (int wg = 1; wg <= 2; ++wg) {
    measure<N, false, 1, 0>(dev, wg), measure<N, true, 1, 0>(dev, wg);
    measure<N, false, 1, 1>(dev, wg), measure<N, true, 1, 1>(dev, wg);
    if constexpr (N < 256) {  // two sets of m64n256 are 256 accumulators a thread: no room
      measure<N, false, 2, 0>(dev, wg), measure<N, true, 2, 0>(dev, wg);
      measure<N, false, 2, 1>(dev, wg), measure<N, true, 2, 1>(dev, wg);
    }
  }
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (prop.major != 9 || prop.minor != 0) {
    std::printf("wgmma_rate_probe: needs compute capability 9.0 (sm_90a), found %d.%d (%s): skipped\n",
                prop.major, prop.minor, prop.name);
    return 0;
  }
  Device dev;
  int khz = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, 0));
  CHECK_CUDA(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0));
  dev.clock_hz = khz * 1e3;
  CHECK_CUDA(cudaMalloc(&dev.sink, dev.sms * kMaxThreads * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dev.cycles, dev.sms * sizeof(long long)));
  std::printf("%s: %d SMs, nominal max SM clock %.0f MHz (cudaDevAttrClockRate)\n", prop.name, dev.sms,
              dev.clock_hz * 1e-6);
  std::printf("MACs a clock an SM: 'MAC nom' at the nominal max clock (event time); 'smclk' per SM clock\n"
              "counted by clock64 (the SMs' real clock under load: 'MHz'). 2:4 counts dense-equivalent MACs\n"
              "(64 N 32 a wgmma), 'MAC real' = half; TFLOPS dense-equivalent, all SMs. Median of 5 after a\n"
              "warm-up. (H100 datasheet: 2048 dense fp16 MACs a clock an SM, 989 TFLOPS at 1830 MHz.)\n");
  std::printf("%-6s %4s %3s %4s %6s %9s %9s %9s %8s %8s %8s\n", "form", "N", "wg", "sets", "wait<>", "us",
              "MAC nom", "MAC real", "smclk", "MHz", "TFLOPS");
  measure_n<32>(dev), measure_n<64>(dev), measure_n<128>(dev), measure_n<256>(dev);

  // The 70B layers: the whole layer's MMAs (K Nl M MACs, spread evenly over the SMs) at the rate of the
  // real kernel's form with N = M, against reading the int4 weights at 3.0 TB/s (dense K Nl / 2 bytes,
  // 2:4 K Nl 3 / 8: half the values plus 2 bits of metadata each). Scales and x are left out.
  std::printf("\n70B layers at the rate of sets=1 wait<0> wg=2, N = M (us; MMA: tensor-core bound, "
              "mem: 3.0 TB/s)\n");
  std::printf("%6s %6s %4s %10s %10s %10s %10s\n", "K", "N", "M", "dense MMA", "dense mem", "2:4 MMA",
              "2:4 mem");
  for (const auto [k, n] : {std::pair{8192.0, 28672.0}, std::pair{28672.0, 8192.0}})
    for (const int m : {64, 128}) {
      double mma_us[2] = {0, 0};
      for (int sparse = 0; sparse < 2; ++sparse)
        for (const auto& [rn, rate] : real_form_rate[sparse])
          if (rn == m) mma_us[sparse] = k * n * m / dev.sms / rate * 1e6;
      std::printf("%6.0f %6.0f %4d %10.1f %10.1f %10.1f %10.1f\n", k, n, m, mma_us[0],
                  k * n / 2 / 3.0e12 * 1e6, mma_us[1], k * n * 3 / 8 / 3.0e12 * 1e6);
    }
  CHECK_CUDA(cudaFree(dev.sink));
  CHECK_CUDA(cudaFree(dev.cycles));
  return 0;
}
