// Small device-side building blocks of the Marlin kernel: asynchronous copies,
// shared-memory matrix loads, tensor-core MMA, 4-bit dequantization and the
// inter-block lock used for the ordered global reduction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace jax_marlin::cuda {

// ---------------------------------------------------------------------------
// Global -> shared copies (cp.async, sm_80+)
// ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Returns v, but ptxas can no longer see how it was computed. Loop-invariant
// offsets derived from threadIdx are otherwise rematerialized: recomputed
// from the thread index inside the main loop (shifts, masks, multiplies
// each tile) to shorten their live ranges, which costs issue slots in a
// loop that is bound by them.
template <typename V>
__device__ __forceinline__ V keep_in_register(V v) {
  if constexpr (sizeof(V) == 8) {
    asm("" : "+l"(v));
  } else {
    asm("" : "+r"(v));
  }
  return v;
}

// keep_in_register where the register file has room for it: up to 4 row
// blocks of accumulators a warp. Beyond (the 128-row tiles, which spill)
// ptxas recomputed the kept values from %tid inside the inner loop anyway,
// with a spill reload: 110 -> 125 instructions a step pair and 9% slower at
// M = 128 (dense kernel, H200); there they are left to the compiler.
template <int kRowBlocksPerWarp, typename V>
__device__ __forceinline__ V keep_if_room(V v) {
  if constexpr (kRowBlocksPerWarp <= 4) {
    return keep_in_register(v);
  } else {
    return v;
  }
}

// 16-byte copy that bypasses L1 (.cg): every tile is read once per block, so
// L1 would only be polluted.
// Shared-memory operands are 32-bit shared-window addresses (smem_addr):
// computed once per thread and stepped, they cost one add per access where a
// generic pointer costs a conversion each time.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem));
}

// As cp_async16, but fills the destination with zeros when !pred. A source
// size of 0 reads nothing, so `gmem` only has to be some valid address.
// Used for activation rows past M, which must contribute exactly zero.
__device__ __forceinline__ void cp_async16_zfill(uint32_t smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_bytes));
}

// Weight tiles are streamed exactly once per call: mark them evict-first so
// they do not push the (re-read by every block) activations out of L2. The
// policy is made once per thread (make_evict_first_policy) and reused.
__device__ __forceinline__ uint64_t make_evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void cp_async16_stream(uint32_t smem, const void* gmem, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem),
               "l"(gmem), "l"(policy));
}

// cp_async16_stream where `hint` (a compile-time constant once inlined),
// else a plain cp_async16: see stream_stripe's prologue.
__device__ __forceinline__ void cp_async16_weights(uint32_t smem, const void* gmem, uint64_t policy,
                                                   bool hint) {
  if (hint) {
    cp_async16_stream(smem, gmem, policy);
  } else {
    cp_async16(smem, gmem);
  }
}

// Starts pulling `bytes` (a multiple of 16) at `gmem` into L2 (sm_90+; a
// no-op before). Only a hint: nothing reaches the SM, and L2 is where every
// SM's writes land, so it is safe even while an earlier kernel may still
// write those bytes (see overlap_previous_grid).
__device__ __forceinline__ void prefetch_l2(const void* gmem, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(gmem), "r"(bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most `kPending` committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// ---------------------------------------------------------------------------
// Tensor cores
// ---------------------------------------------------------------------------

// Two 8x8 b16 matrices: lanes 0-7 point at the rows of the first, 8-15 at
// the rows of the second (the other lanes' addresses are not read).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&frag)[2], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(frag[0]), "=r"(frag[1])
               : "r"(smem));
}

// 4 bytes from shared memory.
__device__ __forceinline__ uint32_t ld_shared4(uint32_t smem) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(smem));
  return v;
}

// 8 bytes from shared memory.
__device__ __forceinline__ uint2 ld_shared8(uint32_t smem) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(smem));
  return v;
}

// 16 bytes from shared memory.
__device__ __forceinline__ uint4 ld_shared16(uint32_t smem) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem));
  return v;
}

template <typename T>
struct MmaOp;

template <>
struct MmaOp<half> {
  static __device__ __forceinline__ void run(const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             float (&c)[4]) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             float (&c)[4]) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ---------------------------------------------------------------------------
// Dequantization: one packed 32-bit word -> two m16n8k16 B fragments
// ---------------------------------------------------------------------------

// lop3 with lookup table (a & b) | c: masks a nibble pair and ORs an exponent
// in one instruction.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  constexpr int kLut = (0xf0 & 0xcc) | 0xaa;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(kLut));
  return r;
}

template <typename T>
__device__ __forceinline__ uint32_t as_u32(T v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2>
__device__ __forceinline__ T2 as_t2(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

// Per-dtype arithmetic. The packed word holds, nibble by nibble, the values
// (b0.x, b1.x, c0.x, c1.x, b0.y, b1.y, c0.y, c1.y) of this lane's two n8
// fragments b (columns c) and c (columns c + 8): the packer's interleave puts
// the two halves of each fragment register 16 bits apart, so one mask
// extracts both at once.
template <typename T>
struct Dtype;

template <>
struct Dtype<half> {
  using T2 = half2;
  // A nibble v OR-ed into the mantissa of 1024.0 (0x6400) is the fp16 value
  // 1024 + v, so no int->float conversion is needed.
  static __device__ __forceinline__ void dequant(uint32_t q, uint32_t (&frag0)[2],
                                                 uint32_t (&frag1)[2]) {
    constexpr uint32_t kLo = 0x000f000f, kHi = 0x00f000f0, kExp = 0x64006400;
    const half2 kSubLo = as_t2<half2>(0x64086408);  // 1024 + 8
    const half2 kMulHi = as_t2<half2>(0x2c002c00);  // 1 / 16
    const half2 kAddHi = as_t2<half2>(0xd480d480);  // -(64 + 8)
    // The high nibble lands at 16 * v in the mantissa: scale it back with an
    // FMA instead of shifting first (saves one instruction per pair).
    const uint32_t lo0 = and_or(q, kLo, kExp), hi0 = and_or(q, kHi, kExp);
    q >>= 8;
    const uint32_t lo1 = and_or(q, kLo, kExp), hi1 = and_or(q, kHi, kExp);
    frag0[0] = as_u32(__hsub2(as_t2<half2>(lo0), kSubLo));
    frag0[1] = as_u32(__hfma2(as_t2<half2>(hi0), kMulHi, kAddHi));
    frag1[0] = as_u32(__hsub2(as_t2<half2>(lo1), kSubLo));
    frag1[1] = as_u32(__hfma2(as_t2<half2>(hi1), kMulHi, kAddHi));
  }
  static __device__ __forceinline__ half2 lo_pair(half2 s) { return __low2half2(s); }
  static __device__ __forceinline__ half2 hi_pair(half2 s) { return __high2half2(s); }
  static __device__ __forceinline__ half2 from_floats(float a, float b) {
    return __floats2half2_rn(a, b);
  }
  static __device__ __forceinline__ float2 to_floats(half2 v) { return __half22float2(v); }
};

template <>
struct Dtype<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // bf16 has only 7 mantissa bits: a nibble fits below the exponent only at
  // bit 0, so the high nibble is shifted down rather than scaled (128.0 =
  // 0x4300 has a unit last place, so 0x4300 | v is exactly 128 + v).
  static __device__ __forceinline__ void dequant(uint32_t q, uint32_t (&frag0)[2],
                                                 uint32_t (&frag1)[2]) {
    constexpr uint32_t kMask = 0x000f000f, kExp = 0x43004300;
    const __nv_bfloat162 kOne = as_t2<__nv_bfloat162>(0x3f803f80);
    const __nv_bfloat162 kSub = as_t2<__nv_bfloat162>(0xc308c308);  // -(128 + 8)
    const uint32_t lo0 = and_or(q, kMask, kExp), hi0 = and_or(q >> 4, kMask, kExp);
    const uint32_t lo1 = and_or(q >> 8, kMask, kExp), hi1 = and_or(q >> 12, kMask, kExp);
    // fma(x, 1, -136) is exact and is a single instruction on sm_80 too
    // (where bf16 subtraction is emulated).
    frag0[0] = as_u32(__hfma2(as_t2<__nv_bfloat162>(lo0), kOne, kSub));
    frag0[1] = as_u32(__hfma2(as_t2<__nv_bfloat162>(hi0), kOne, kSub));
    frag1[0] = as_u32(__hfma2(as_t2<__nv_bfloat162>(lo1), kOne, kSub));
    frag1[1] = as_u32(__hfma2(as_t2<__nv_bfloat162>(hi1), kOne, kSub));
  }
  static __device__ __forceinline__ __nv_bfloat162 lo_pair(__nv_bfloat162 s) {
    return __low2bfloat162(s);
  }
  static __device__ __forceinline__ __nv_bfloat162 hi_pair(__nv_bfloat162 s) {
    return __high2bfloat162(s);
  }
  static __device__ __forceinline__ __nv_bfloat162 from_floats(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
  static __device__ __forceinline__ float2 to_floats(__nv_bfloat162 v) {
    return __bfloat1622float2(v);
  }
};

// Multiply both registers of a B fragment by one broadcast scale pair.
template <typename T>
__device__ __forceinline__ void scale_fragment(uint32_t (&frag)[2], typename Dtype<T>::T2 s) {
  using T2 = typename Dtype<T>::T2;
  frag[0] = as_u32(__hmul2(as_t2<T2>(frag[0]), s));
  frag[1] = as_u32(__hmul2(as_t2<T2>(frag[1]), s));
}

// Group scales on an mma.sp A fragment (docs/SPARSE_FORMAT.md): a0, a2 hold
// n-row g (scale pair s's lo half), a1, a3 n-row g + 8 (its hi half).
template <typename T>
__device__ __forceinline__ void scale_sparse_fragment(uint32_t (&a)[4], typename Dtype<T>::T2 s) {
  using T2 = typename Dtype<T>::T2;
  const T2 lo = Dtype<T>::lo_pair(s), hi = Dtype<T>::hi_pair(s);
  a[0] = as_u32(__hmul2(as_t2<T2>(a[0]), lo));
  a[1] = as_u32(__hmul2(as_t2<T2>(a[1]), hi));
  a[2] = as_u32(__hmul2(as_t2<T2>(a[2]), lo));
  a[3] = as_u32(__hmul2(as_t2<T2>(a[3]), hi));
}

// ---------------------------------------------------------------------------
// Inter-block reduction: who completes a tile shared by several blocks
// ---------------------------------------------------------------------------

// Runs kSteps steps of `load(i, operands)` then `multiply(operands)`,
// software-pipelined over two operand buffers: step i + 1's loads are issued
// before step i's multiply, so their shared-memory latency hides behind its
// math (a scheduler has only two warps to switch between at one block of 8
// warps an SM). kRolled keeps the pairs a loop, for tiles whose accumulators
// leave few registers; otherwise the steps unroll fully. kTwoBuffers = false
// runs the steps one after another from one buffer: at 8 row blocks a warp
// the 128 accumulators leave no room for a second one (it would spill).
template <int kSteps, bool kRolled, bool kTwoBuffers, typename Operands, typename Load,
          typename Multiply>
__device__ __forceinline__ void pipelined_steps(Load&& load, Multiply&& multiply) {
  if constexpr (!kTwoBuffers) {
    Operands op;
#pragma unroll(kRolled ? 1 : kSteps)
    for (int i = 0; i < kSteps; ++i) {
      load(i, op);
      multiply(op);
    }
  } else {
    Operands even, odd;
    load(0, even);
    if constexpr (kSteps == 1) {
      multiply(even);
    } else {
      static_assert(kSteps % 2 == 0, "steps go in pairs");
#pragma unroll(kRolled ? 1 : kSteps / 2)
      for (int i = 0; i < kSteps; i += 2) {
        load(i + 1, odd);
        multiply(even);
        if (i + 2 < kSteps) load(i + 2, even);
        multiply(odd);
      }
    }
  }
}

// Which block's stripe holds iteration `it`, when `total` iterations are dealt
// into `stripes` stripes starting at floor(b * total / stripes).
__device__ __forceinline__ int stripe_of(int it, int total, int stripes) {
  return static_cast<int>(((static_cast<long long>(it) + 1) * stripes + total - 1) / total) - 1;
}


// Call after this block stored its partial sums (every thread reaches it).
// Counts the block in on `counter`; true in exactly one of the `parts`
// blocks, the last to arrive, which then sees every other block's partial
// sums and leaves the counter at 0 for the next launch. One acquire-release
// count instead of two sequentially consistent fences (__threadfence): the
// barrier orders the block's stores before thread 0's release, which makes
// them visible with the count (release is cumulative); the last block's
// acquire then sees every earlier block's, and the second barrier passes
// that on to its other threads. The reset needs no ordering: the next
// launch starts after this one ends.
// Barrier over the block's first kThreads threads (a multiple of 32), or
// the whole block (__syncthreads) where kThreads is 0. Named barrier 1: 0 is
// __syncthreads'.
template <int kThreads>
__device__ __forceinline__ void sync_first_threads() {
  if constexpr (kThreads == 0) {
    __syncthreads();
  } else {
    static_assert(kThreads % 32 == 0, "named barriers count whole warps");
    asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
  }
}

// kThreads: the threads that reach it, the block's first ones; fewer than
// the block where a producer warp (ProducerWarp tiles) has left the loop,
// which then synchronise on a named barrier of their own instead.
template <int kThreads = 0>
__device__ __forceinline__ bool last_to_arrive(int* counter, int parts) {
  __shared__ int is_last;
  sync_first_threads<kThreads>();
  if (threadIdx.x == 0) {
    int before;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;\n" : "=r"(before) : "l"(counter) : "memory");
    const bool last = before == parts - 1;
    if (last) *counter = 0;
    is_last = last;
  }
  sync_first_threads<kThreads>();
  return is_last;
}

// ---------------------------------------------------------------------------
// Tensor-memory-access (TMA) copies with mbarrier completion (sm_90+): what
// x may come into the stages through instead of per-thread cp.async
// (TileShape::kTmaX). One thread issues a stage's copies; the consumers wait
// on the stage's mbarrier. The copy engine writes through the async proxy,
// so wgmma may read the data without a proxy fence. Elsewhere these trap
// (the launchers never pick a kTmaX tile below compute capability 9.0).
// ---------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JAX_MARLIN_HAS_TMA 1
#else
#define JAX_MARLIN_HAS_TMA 0
#endif

__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
#if JAX_MARLIN_HAS_TMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
#endif
}
// Makes the initialised barriers visible to the copy engine (async proxy).
__device__ __forceinline__ void fence_mbarrier_init() {
#if JAX_MARLIN_HAS_TMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// This thread's arrival, announcing `bytes` that copies will complete on
// the barrier (the phase ends when both are in).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if JAX_MARLIN_HAS_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}
// This thread's plain arrival on the barrier (no transaction bytes).
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
#if JAX_MARLIN_HAS_TMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  __trap();
#endif
}
// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
#if JAX_MARLIN_HAS_TMA
  asm volatile(
      "{\n.reg .pred done;\n"
      "x_wait_loop:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra x_wait_loop;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  __trap();
#endif
}
// The box of a 2-D tensor map at element coordinates (c0 fastest, c1) into
// shared memory at `dst`, completing its bytes on barrier `bar`. Elements
// outside the tensor (rows past M) arrive as zeros.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void* map, int c0, int c1,
                                            uint32_t bar) {
#if JAX_MARLIN_HAS_TMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#else
  __trap();
#endif
}

// `bytes` (a multiple of 16) contiguous at `gmem` into shared memory at
// `dst` (both 16-byte aligned) by the copy engine (a 1-D bulk copy),
// completing its bytes on barrier `bar`; with an L2 cache policy where
// `hint` (a compile-time constant once inlined), as cp_async16_weights.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* gmem, uint32_t bytes, uint32_t bar) {
#if JAX_MARLIN_HAS_TMA
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(gmem), "r"(bytes), "r"(bar)
      : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void bulk_copy_weights(uint32_t dst, const void* gmem, uint32_t bytes, uint32_t bar,
                                                  uint64_t policy, bool hint) {
#if JAX_MARLIN_HAS_TMA
  if (hint) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1], %2, [%3], %4;\n" ::"r"(dst),
        "l"(gmem), "r"(bytes), "r"(bar), "l"(policy)
        : "memory");
  } else {
    bulk_copy(dst, gmem, bytes, bar);
  }
#else
  __trap();
#endif
}

}  // namespace jax_marlin::cuda
