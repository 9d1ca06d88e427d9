// Hopper (sm_90a) warpgroup MMA with the A operand in registers: the pieces
// the Marlin kernel's wgmma tiles use. Compiled only for sm_90a; elsewhere
// (and for other tiles) these are never instantiated.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

// wgmma exists only in sm_90a code; other targets compile these to a trap
// (the dispatch never selects a wgmma tile for them).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JAX_MARLIN_HAS_WGMMA 1
#else
#define JAX_MARLIN_HAS_WGMMA 0
#endif

namespace jax_marlin::cuda {

// Shared-memory matrix descriptor, no swizzle ("interleaved" core matrices
// of 8 rows x 16 bytes): start address, leading- and stride-dimension byte
// offsets, each in 16-byte units; layout type 0 (bits 62-63).
__device__ __forceinline__ uint64_t wgmma_descriptor(uint32_t smem, uint32_t leading_bytes,
                                                     uint32_t stride_bytes) {
  return (static_cast<uint64_t>((smem >> 4) & 0x3fff)) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3fff) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3fff) << 32);
}

// The descriptor of a K-major operand in the 128-byte swizzled layout the
// copy engine writes (CU_TENSOR_MAP_SWIZZLE_128B): rows of 128 bytes (64
// 16-bit elements of K), 16-byte chunk c of row r at c ^ (r % 8), 8-row
// atoms of 1024 bytes one after another (stride offset). `smem` is the
// atom's start (1024-byte aligned) plus 32 bytes per k16 step into the row:
// the swizzle applies to the address bits, so stepping the start is enough.
// The leading offset is unused for a K-major swizzled operand (1 by
// convention); layout type 1 (bits 62-63): 128-byte swizzle.
__device__ __forceinline__ uint64_t wgmma_descriptor_sw128(uint32_t smem) {
  return (static_cast<uint64_t>((smem >> 4) & 0x3fff)) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (uint64_t{1} << 62);
}

// Which of the descriptor's two byte offsets steps along K for a K-major
// operand without swizzle (the other steps between 8-row groups).
// tests/cuda/wgmma_probe.cu checks both on the device.
inline constexpr bool kWgmmaLeadingIsK = true;

__device__ __forceinline__ void wgmma_fence() {
#if JAX_MARLIN_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if JAX_MARLIN_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#if JAX_MARLIN_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// A wgmma D fragment per slab (or 2:4 run) s holds element 4 rb + e of the
// m16n8 accumulator layout acc[rb][s][e] (rb: 8 rows of x). Named as one
// array for the asm; copies between the two are register renames.
template <int kRB, int kJ, int kS, int kD>
__device__ __forceinline__ void accumulators_to_wgmma(const float (&acc)[kRB][kJ][4], float (&d)[kS][kD]) {
  static_assert(kS <= kJ && 4 * kRB <= kD, "a D fragment per slab, 4 floats per 8 rows");
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
      for (int e = 0; e < 4; ++e) d[s][4 * rb + e] = acc[rb][s][e];
}
template <int kRB, int kJ, int kS, int kD>
__device__ __forceinline__ void wgmma_to_accumulators(const float (&d)[kS][kD], float (&acc)[kRB][kJ][4]) {
  static_assert(kS <= kJ && 4 * kRB <= kD, "a D fragment per slab, 4 floats per 8 rows");
#pragma unroll
  for (int s = 0; s < kS; ++s)
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[rb][s][e] = d[s][4 * rb + e];
}

// acc += d times the group scales of the accumulators' weight columns (the
// scales applied in fp32, once a stage, to fresh wgmma accumulators): in
// wgmma's D layout a thread's floats 4 r + {0, 1} of fragment f are its
// weight column 16 w + g of that slab (the scale pair's low half, s[f].x),
// floats 4 r + {2, 3} column 16 w + g + 8 (s[f].y).
template <int kRB, int kJ, int kS, int kD>
__device__ __forceinline__ void wgmma_scaled_into_accumulators(const float (&d)[kS][kD], const float2 (&s)[kS],
                                                               float (&acc)[kRB][kJ][4]) {
  static_assert(kS <= kJ && 4 * kRB <= kD, "a D fragment per slab, 4 floats per 8 rows");
#pragma unroll
  for (int f = 0; f < kS; ++f)
#pragma unroll
    for (int rb = 0; rb < kRB; ++rb) {
      acc[rb][f][0] += d[f][4 * rb + 0] * s[f].x;
      acc[rb][f][1] += d[f][4 * rb + 1] * s[f].x;
      acc[rb][f][2] += d[f][4 * rb + 2] * s[f].y;
      acc[rb][f][3] += d[f][4 * rb + 3] * s[f].y;
    }
}

// Shared memory written through the generic proxy (cp.async, st.shared)
// must be fenced before the async proxy (wgmma) reads it.
__device__ __forceinline__ void fence_proxy_async() {
#if JAX_MARLIN_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Warpgroup register reallocation (sm_90a): every warp of the warpgroup
// executes it; dec gives registers back to the block's pool, inc waits until
// the pool has them. kRegs: the new per-thread count (a multiple of 8).
template <int kRegs>
__device__ __forceinline__ void warpgroup_registers_dec() {
#if JAX_MARLIN_HAS_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void warpgroup_registers_inc() {
#if JAX_MARLIN_HAS_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// What each of a block's kConsumerThreads consumer threads may ask
// warpgroup_registers_inc for, where the block's other threads are one
// producer warpgroup that drops to kProducerRegs: the block holds what
// ptxas gives every thread at launch (the most __launch_bounds__ allows,
// 65536 / threads down to a multiple of 8), and the consumers share out
// what the producers give back (whole multiples of 8, at most 256). Asking
// for more than the block holds would make the inc wait for ever.
template <int kConsumerThreads, int kProducerRegs>
__host__ __device__ constexpr int consumer_registers() {
  constexpr int kThreads = kConsumerThreads + 128;
  constexpr int kAtLaunch = (65536 / kThreads < 255 ? 65536 / kThreads : 255) / 8 * 8;
  constexpr int kShare = (kAtLaunch * kThreads - 128 * kProducerRegs) / kConsumerThreads / 8 * 8;
  static_assert(kConsumerThreads % 128 == 0 && kShare >= kAtLaunch, "whole consumer warpgroups, which gain");
  return kShare < 256 ? kShare : 256;
}

// D (64 x N fp32; N / 2 registers a thread) += A (64 x 16, registers: warp w
// of the warpgroup holds rows 16 w .. 16 w + 15 as an m16n8k16 A fragment)
// * B (16 x N, K-major, shared memory by descriptor). T: half or bfloat16.
template <typename T, int N>
struct WgmmaRS;

// D (64 x N fp32; N / 2 registers a thread) += A (64 x 32, 2:4 sparse along
// K, from registers) * B (32 x N, K-major, shared memory by descriptor):
// wgmma.mma_async.sp m64nNk32. T: half or bfloat16. Warp w of the warpgroup
// holds rows 16 w .. 16 w + 15 of A as an mma.sp m16n8k32 A fragment (the
// m16n8k16 layout on the 16 x 16 kept values: a0 row g chunk t, a1 row g + 8
// chunk t, a2 row g chunk t + 4, a3 row g + 8 chunk t + 4; two kept values of
// a chunk a register, in increasing k) and `e` its metadata register; with
// kSelector the thread pair of each group of four that supplies it (0: lanes
// t = 0, 1; 1: t = 2, 3), one immediate for the whole warpgroup (the
// instruction is .aligned: every warp must issue the same one). PTX ISA
// 9.7.15.6 ("wgmma.mma_async.sp"): for .f16 / .bf16, every 64xNx32 shape is
// 2:4 sparse, the selector names a thread pair as for mma.sp m16n8k32.
// Operand order: d, a, b-desc, sp-meta, sp-sel, scale-d, imm-scale-a,
// imm-scale-b, imm-trans-b.
template <typename T, int N>
struct WgmmaSpRS;

// The operands of each shape N, in the asm's numbering: D (N / 2 registers,
// JAX_MARLIN_D<N / 2>), A (4), the B descriptor; the sparse form adds the
// metadata register and the selector.
#define JAX_MARLIN_OPERANDS_8 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, %8"
#define JAX_MARLIN_SP_OPERANDS_8 ", %9, %10"
#define JAX_MARLIN_OPERANDS_16 "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12"
#define JAX_MARLIN_SP_OPERANDS_16 ", %13, %14"
#define JAX_MARLIN_OPERANDS_32                                                                               \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, "                           \
  "%17, %18, %19}, %20"
#define JAX_MARLIN_SP_OPERANDS_32 ", %21, %22"
#define JAX_MARLIN_OPERANDS_64                                                                               \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, "                             \
  "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "                             \
  "{%32, %33, %34, %35}, %36"
#define JAX_MARLIN_SP_OPERANDS_64 ", %37, %38"
#define JAX_MARLIN_OPERANDS_128                                                                              \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, "                             \
  "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, "                         \
  "%33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, "                         \
  "%49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                             \
  "{%64, %65, %66, %67}, %68"
#define JAX_MARLIN_SP_OPERANDS_128 ", %69, %70"
#define JAX_MARLIN_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define JAX_MARLIN_D8(i) JAX_MARLIN_D4(i), JAX_MARLIN_D4(i + 4)
#define JAX_MARLIN_D16(i) JAX_MARLIN_D8(i), JAX_MARLIN_D8(i + 8)
#define JAX_MARLIN_D32(i) JAX_MARLIN_D16(i), JAX_MARLIN_D16(i + 16)
#define JAX_MARLIN_D64(i) JAX_MARLIN_D32(i), JAX_MARLIN_D32(i + 32)
// One wgmma of shape m64nNk16 (dense) or m64nNk32 (2:4 sparse): N a
// literal, TYPE "f16" or "bf16", then the D operands (__VA_ARGS__, as they
// contain commas). The predicate p (scale-d) is true: D accumulates; the
// dense form's ACC 0 makes it false: D = A B, whatever D held.
#if JAX_MARLIN_HAS_WGMMA
#define JAX_MARLIN_WGMMA(N, TYPE, ACC, ...)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " #ACC ", 0;\n"                                             \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " "                           \
               JAX_MARLIN_OPERANDS_##N ", p, 1, 1, 0;\n}\n"                                                  \
               : __VA_ARGS__                                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))
#define JAX_MARLIN_WGMMA_SP(N, TYPE, ...)                                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                    \
               "wgmma.mma_async.sp.sync.aligned.m64n" #N "k32.f32." TYPE "." TYPE " "                        \
               JAX_MARLIN_OPERANDS_##N JAX_MARLIN_SP_OPERANDS_##N ", p, 1, 1, 0;\n}\n"                       \
               : __VA_ARGS__                                                                                 \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e), "n"(kSelector))
#else
#define JAX_MARLIN_WGMMA(N, TYPE, ACC, ...) __trap()
#define JAX_MARLIN_WGMMA_SP(N, TYPE, ...) __trap()
#endif
// WgmmaRS<T, N>'s member NAME: one wgmma, ACC as in JAX_MARLIN_WGMMA, the D
// operands last (__VA_ARGS__).
#define JAX_MARLIN_WGMMA_RS_MEMBER(NAME, N, ACC, ...)                                                        \
  static __device__ __forceinline__ void NAME(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {       \
    if constexpr (std::is_same_v<T, half>) {                                                                 \
      JAX_MARLIN_WGMMA(N, "f16", ACC, __VA_ARGS__);                                                          \
    } else {                                                                                                 \
      JAX_MARLIN_WGMMA(N, "bf16", ACC, __VA_ARGS__);                                                         \
    }                                                                                                        \
  }
// WgmmaRS<T, N> and WgmmaSpRS<T, N>, T half or bfloat16. WgmmaRS::run_fresh:
// D = A B, d's values not read (the first wgmma into fresh accumulators).
#define JAX_MARLIN_WGMMA_SHAPE(N, D_OPERANDS)                                                                \
  template <typename T>                                                                                      \
  struct WgmmaRS<T, N> {                                                                                     \
    JAX_MARLIN_WGMMA_RS_MEMBER(run, N, 1, D_OPERANDS)                                                        \
    JAX_MARLIN_WGMMA_RS_MEMBER(run_fresh, N, 0, D_OPERANDS)                                                  \
  };                                                                                                         \
  template <typename T>                                                                                      \
  struct WgmmaSpRS<T, N> {                                                                                   \
    template <int kSelector>                                                                                 \
    static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4], uint32_t e,        \
                                               uint64_t b) {                                                 \
      if constexpr (std::is_same_v<T, half>) {                                                               \
        JAX_MARLIN_WGMMA_SP(N, "f16", D_OPERANDS);                                                           \
      } else {                                                                                               \
        JAX_MARLIN_WGMMA_SP(N, "bf16", D_OPERANDS);                                                          \
      }                                                                                                      \
    }                                                                                                        \
  };

JAX_MARLIN_WGMMA_SHAPE(8, JAX_MARLIN_D4(0))
JAX_MARLIN_WGMMA_SHAPE(16, JAX_MARLIN_D8(0))
JAX_MARLIN_WGMMA_SHAPE(32, JAX_MARLIN_D16(0))
JAX_MARLIN_WGMMA_SHAPE(64, JAX_MARLIN_D32(0))
JAX_MARLIN_WGMMA_SHAPE(128, JAX_MARLIN_D64(0))

#undef JAX_MARLIN_WGMMA_SHAPE
#undef JAX_MARLIN_WGMMA_RS_MEMBER
#undef JAX_MARLIN_WGMMA_SP
#undef JAX_MARLIN_WGMMA
#undef JAX_MARLIN_D64
#undef JAX_MARLIN_D32
#undef JAX_MARLIN_D16
#undef JAX_MARLIN_D8
#undef JAX_MARLIN_D4
#undef JAX_MARLIN_SP_OPERANDS_8
#undef JAX_MARLIN_OPERANDS_8
#undef JAX_MARLIN_SP_OPERANDS_16
#undef JAX_MARLIN_OPERANDS_16
#undef JAX_MARLIN_SP_OPERANDS_32
#undef JAX_MARLIN_OPERANDS_32
#undef JAX_MARLIN_SP_OPERANDS_64
#undef JAX_MARLIN_OPERANDS_64
#undef JAX_MARLIN_SP_OPERANDS_128
#undef JAX_MARLIN_OPERANDS_128

}  // namespace jax_marlin::cuda
