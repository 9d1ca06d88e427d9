// Tuning tool: times candidate tile shapes of the Marlin kernel directly,
// bypassing the dispatch table, on Llama-sized layers (fp16, group 128), and
// the per-call lock memset on its own. Its output is what the dispatch table
// in csrc/cuda/marlin_dispatch.cu should be chosen from.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc \
//        tests/cuda/marlin_tile_sweep.cu csrc/cuda/marlin_dispatch.cu -o sweep && ./sweep [K N]
//
// Each row also checks the candidate's output against the production
// launcher's on the same (pseudo-random) operands: "same" or "MISMATCH".
//
// With K N, only that layer (e.g. under ncu: `ncu -k regex:marlin_kernel
// --launch-skip 20 --launch-count 1 ./sweep 8192 8192` profiles the first
// candidate, the current small-batch tile, at M = 1).
//
// With --fixed, the fixed cost of a call at M = 1 instead (see fixed_costs);
// built with -DJAX_MARLIN_PHASES, --phases prints a call's timeline (phase_report).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/launch_util.h"
#include "cuda/marlin_kernel.cuh"
#include "cuda/marlin_launch.h"
#include "cuda/sparse_kernel.cuh"  // SparseMmaOp, for the mma.sp rate
#include "cuda_test_util.h"
#include "device_fill.cuh"

using namespace jax_marlin::cuda;

struct Layer {
  int k, n;
  std::vector<void*> packed, scales;  // copies rotated through 4x the L2
};

struct Buffers {
  void* x;
  void* y;
  void* y_ref;  // the production launcher's result, to check candidates against
  float* workspace;
  int* locks;
  int* ref_locks;
};

__global__ void fill_halves(half* out, size_t n, float lo, float hi, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x)
    out[i] = __float2half(lo + (hi - lo) * (hash_u32(static_cast<uint32_t>(i) + seed) % 4096) / 4096.f);
}

// max |y - y_ref| / max |y_ref| over the first m rows.
static double max_rel_diff(const Buffers& b, int m, int n) {
  std::vector<half> y(static_cast<size_t>(m) * n), ref(y.size());
  CHECK_CUDA(cudaMemcpy(y.data(), b.y, y.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(ref.data(), b.y_ref, ref.size() * 2, cudaMemcpyDeviceToHost));
  double diff = 0, scale = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double a = __half2float(y[i]), r = __half2float(ref[i]);
    if (!(std::abs(a - r) <= diff)) diff = std::abs(a - r);  // NaN-propagating max
    scale = std::max(scale, std::abs(r));
  }
  return diff / scale;
}

// The tensor map a kTmaX tile's kernel takes (as launch_tile makes it).
template <typename Tile>
static CUtensorMap x_tensor_map(const void* x, int m, int k) {
  alignas(64) CUtensorMap map;
  CHECK_CUDA(encode_x_tensor_map(&map, x, m, k, Tile::kXBoxK, Tile::kTileM, Tile::kXBoxK == 64));
  return map;
}

// The kernel a tile runs: marlin_kernel, or with x by TMA marlin_kernel_tma_x.
template <typename Tile>
static const void* kernel_of() {
  if constexpr (Tile::kTmaX) {
    return reinterpret_cast<const void*>(&marlin_kernel_tma_x<half, Tile>);
  } else {
    return reinterpret_cast<const void*>(&marlin_kernel<half, Tile>);
  }
}

static int g_sms = 0;
static double g_bw = 3.0e12;  // copy bandwidth, measured in main()
// Blocks launched = resident blocks / g_grid_divisor (--fixed: fewer, longer stripes).
static int g_grid_divisor = 1;

// Kernel only: the locks were zeroed once and every launch leaves them zeroed
// (the memset a scratch lock buffer would need is timed separately).
template <typename Tile>
static void time_fitting_tile(const char* name, Layer& layer, const Buffers& b, int m, bool rotate,
                              bool probe) {
  CHECK_CUDA(cudaFuncSetAttribute(kernel_of<Tile>(), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Tile::kSmemBytes));
  // Every block must be resident (the ordered reduction waits across
  // blocks): skip a tile that does not get the blocks per SM it was built for.
  int resident = 0;
  CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel_of<Tile>(),
                                                           Tile::kBlockThreads, Tile::kSmemBytes));
  if (resident < Tile::kBlocksPerSM) {
    std::printf("%6d %6d %4d  %-28s only %d resident block(s) per SM: skipped\n", layer.k, layer.n,
                m, name, resident);
    return;
  }
  const int n_tiles = layer.n / Tile::kTileN;
  const int total = (layer.k / Tile::kTileK) * n_tiles;
  const int copies = rotate ? static_cast<int>(layer.packed.size()) : 1;
  CUtensorMap x_map{};
  if constexpr (Tile::kTmaX) x_map = x_tensor_map<Tile>(b.x, m, layer.k);
  const float us = median_us_per_call(
      [&](int i, cudaStream_t stream) {
        MarlinParams<half> p;
        p.x = static_cast<const half*>(b.x);
        p.packed = static_cast<const int4*>(layer.packed[i % copies]);
        p.scales = static_cast<const half*>(layer.scales[i % copies]);
        p.y = static_cast<half*>(b.y);
        p.workspace = b.workspace;
        p.locks = b.locks;  // zeroed once below; the kernel leaves them at zero
        p.rows = m;
        p.k = layer.k;
        p.n = layer.n;
        p.group_shift = 7;
        p.stripes = stripe_count(total, n_tiles, std::max(1, g_sms * Tile::kBlocksPerSM / g_grid_divisor));
        p.overlapped = false;  // a plain launch
        if constexpr (Tile::kTmaX) {
          marlin_kernel_tma_x<half, Tile><<<p.stripes, Tile::kBlockThreads, Tile::kSmemBytes, stream>>>(p, x_map);
        } else {
          marlin_kernel<half, Tile><<<p.stripes, Tile::kBlockThreads, Tile::kSmemBytes, stream>>>(p);
        }
        CHECK_CUDA(cudaGetLastError());
      },
      4 * copies);
  // The last timed launch used copy (4 copies - 1) % copies = copies - 1:
  // compare with the production launcher on the same operands.
  MarlinProblem ref{ActDtype::kFloat16, b.x, layer.packed[copies - 1], layer.scales[copies - 1],
                    b.y_ref, b.workspace, b.ref_locks, false, m, layer.k, layer.n, 128};
  CHECK_CUDA(marlin_matmul(ref, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const double diff = probe ? 0.0 : max_rel_diff(b, m, layer.n);
  const double bytes = layer.k * double(layer.n) / 2 + layer.k / 128.0 * layer.n * 2 +
                       2.0 * m * (layer.k + layer.n);
  std::printf("%6d %6d %4d  %-28s stages=%d smem=%3dKB  %8.2f us  %6.1f%% of roofline  %s (%.1e)\n",
              layer.k, layer.n, m, name, Tile::kStages, Tile::kSmemBytes / 1024, us,
              100.0 * bytes / g_bw / (us * 1e-6),
              probe ? "probe" : diff <= 1e-2 ? "same" : "MISMATCH", diff);
}

// Times one candidate on one layer (see time_fitting_tile); a tile whose
// stages do not fit shared memory is reported, not instantiated.
// rotate = false keeps one copy of the weights (L2-resident when it fits):
// the gap to the rotated time is what HBM costs. Probes (loads-only,
// per-channel on group-128 data) compute something else: not checked.
// JAX_MARLIN_SWEEP_ONLY=<text>: only the rows whose name contains it (e.g.
// "tma-x" under compute-sanitizer).
template <typename Tile>
static void time_tile(const char* name, Layer& layer, const Buffers& b, int m, bool rotate = true,
                      bool probe = false) {
  if (layer.k % Tile::kTileK || layer.n % Tile::kTileN) return;
  if (const char* only = std::getenv("JAX_MARLIN_SWEEP_ONLY"); only && !std::strstr(name, only)) return;
  if constexpr (!Tile::kFits) {
    std::printf("%6d %6d %4d  %-28s does not fit shared memory\n", layer.k, layer.n, m, name);
  } else {
    time_fitting_tile<Tile>(name, layer, b, m, rotate, probe);
  }
}

// Candidate RB x NB x KB x W: RB 8-row blocks of x, a (16 KB) x (16 NB)
// tile of the weight, W warps; "msplit2": two warps share each 64-column
// slab, half the row blocks each.
#define SWEEP(RB, NB, KB, W) \
  time_tile<TileShape<RB, NB, KB, W, true>>("r" #RB " n" #NB " k" #KB " w" #W, layer, b, m)
#define SWEEPM2(RB, NB, KB, W)                                                                   \
  time_tile<TileShape<RB, NB, KB, W, true, 1, 2>>("r" #RB " n" #NB " k" #KB " w" #W " msplit2", \
                                                  layer, b, m)
// "jsplit2": two warps share each slab by columns (two n16 sub-tiles and
// every row block each), so no weight is dequantized twice.
#define SWEEPJ2(RB, NB, KB, W)                                                                     \
  time_tile<TileShape<RB, NB, KB, W, true, 1, 1, false, false, 2>>("r" #RB " n" #NB " k" #KB " w" #W \
                                                                   " jsplit2",                      \
                                                                   layer, b, m)
// "wgmma": warpgroup MMA tiles (sm_90a; this tool is built for it).
#define SWEEPW(RB, NB, KB, W)                                                                     \
  time_tile<TileShape<RB, NB, KB, W, true, 1, 1, false, true>>("r" #RB " n" #NB " k" #KB " w" #W \
                                                               " wgmma",                        \
                                                               layer, b, m)

// "wgmma tma-x": the same with x copied in by TMA (kTmaX).
#define SWEEPWT(RB, NB, KB, W)                                                                  \
  time_tile<TileShape<RB, NB, KB, W, true, 1, 1, false, true, 1, true>>(                         \
      "r" #RB " n" #NB " k" #KB " w" #W " wgmma tma-x", layer, b, m)

// "producer": the same with a producer warp issuing every copy, the
// weights and scales by 1-D bulk copies (ProducerWarp: the production
// wgmma tiles).
#define SWEEPWTP(RB, NB, KB, W)                                                                 \
  time_tile<ProducerWarp<TileShape<RB, NB, KB, W, true, 1, 1, false, true, 1, true>>>(           \
      "r" #RB " n" #NB " k" #KB " w" #W " wgmma tma-x producer", layer, b, m)

// "trail": the producer tile whose last wgmma group of a stage runs on into
// the next stage (ProducerWarp's kTrail).
#define SWEEPWTR(RB, NB, KB, W)                                                                 \
  time_tile<ProducerWarp<TileShape<RB, NB, KB, W, true, 1, 1, false, true, 1, true>, true>>(     \
      "r" #RB " n" #NB " k" #KB " w" #W " wgmma tma-x trail", layer, b, m)

// "tma-x" (mma.sync): the production tiles with x by TMA (128-byte swizzle).
#define SWEEPT(RB, NB, KB, W)                                                                     \
  time_tile<TileShape<RB, NB, KB, W, true, 1, 1, false, false, 1, true>>(                          \
      "r" #RB " n" #NB " k" #KB " w" #W " tma-x", layer, b, m)
#define SWEEPJ2T(RB, NB, KB, W)                                                                   \
  time_tile<TileShape<RB, NB, KB, W, true, 1, 1, false, false, 2, true>>(                          \
      "r" #RB " n" #NB " k" #KB " w" #W " jsplit2 tma-x", layer, b, m)

// Enough copies of a K x N layer's weights and scales to rotate through
// 200 MB (4x the L2), filled deterministically.
static Layer make_layer(int k, int n) {
  Layer layer{k, n, {}, {}};
  const size_t w_bytes = size_t(k) * n / 2, s_bytes = size_t(k / 128) * n * 2;
  const int copies = static_cast<int>(std::max<size_t>(2, ((size_t{200} << 20) + w_bytes - 1) / w_bytes));
  for (int c = 0; c < copies; ++c) {
    void *w, *sc;
    CHECK_CUDA(cudaMalloc(&w, w_bytes));
    CHECK_CUDA(cudaMalloc(&sc, s_bytes));
    fill_words<<<1024, 256>>>(static_cast<uint32_t*>(w), w_bytes / 4, 77 + c);
    fill_halves<<<1024, 256>>>(static_cast<half*>(sc), s_bytes / 2, 1e-3f, 1e-2f, 99 + c);
    CHECK_CUDA(cudaGetLastError());
    layer.packed.push_back(w);
    layer.scales.push_back(sc);
  }
  return layer;
}

static void free_layer(Layer& layer) {
  for (void* p : layer.packed) cudaFree(p);
  for (void* p : layer.scales) cudaFree(p);
}

__global__ void empty_kernel() {}

// mma.sync issue-rate probe: each warp runs kChains independent m16n8k16
// accumulations (as the kernel's row blocks x sub-tiles are) for `iters`
// rounds, no memory traffic. Writes the sums so nothing is optimised out.
template <int kChains>
__global__ void __launch_bounds__(256, 1) mma_rate_kernel(int iters, float* out) {
  uint32_t a[4] = {threadIdx.x, threadIdx.x + 1, threadIdx.x + 2, threadIdx.x + 3};
  uint32_t b[2] = {threadIdx.x * 3u, threadIdx.x * 5u};
  float acc[kChains][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) MmaOp<half>::run(a, b, acc[c]);
  }
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) sum += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// The same with mma.sp m16n8k32 (2:4 sparse A): each does the math of two
// dense m16n8k16. Metadata 0x4444...: kept positions (0, 1) in every group.
template <int kChains>
__global__ void __launch_bounds__(256, 1) mma_sp_rate_kernel(int iters, float* out) {
  uint32_t a[4] = {threadIdx.x, threadIdx.x + 1, threadIdx.x + 2, threadIdx.x + 3};
  uint32_t b[4] = {threadIdx.x * 3u, threadIdx.x * 5u, threadIdx.x * 7u, threadIdx.x * 11u};
  const uint32_t e = 0x44444444u;
  float acc[kChains][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) SparseMmaOp<half>::run<0>(a, b, e, acc[c]);
  }
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) sum += acc[c][0] + acc[c][1] + acc[c][2] + acc[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum;
}

// The mma.sync ceiling at M >= 32: HMMA.16816.F32 a clock and SM with one
// block of 8 warps an SM (as the large-M tiles run), 16 or 32 chains a warp.
template <int kChains, bool kSparse = false>
static void mma_rate() {
  constexpr int kIters = 4096;
  float* out = nullptr;
  CHECK_CUDA(cudaMalloc(&out, size_t{4} * g_sms * 256));
  const float us = median_us_per_call(
      [&](int, cudaStream_t stream) {
        if constexpr (kSparse) {
          mma_sp_rate_kernel<kChains><<<g_sms, 256, 0, stream>>>(kIters, out);
        } else {
          mma_rate_kernel<kChains><<<g_sms, 256, 0, stream>>>(kIters, out);
        }
        CHECK_CUDA(cudaGetLastError());
      },
      20);
  int clock_khz = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  const double mmas_per_sm = 8.0 * kIters * kChains;
  const double cycles = us * 1e-6 * clock_khz * 1e3;
  // Dense-equivalent flops: an m16n8k32 sparse MMA stands for 16 x 8 x 32.
  const int k = kSparse ? 32 : 16;
  std::printf("%s f32, 8 warps an SM, %d chains a warp: %.1f us, %.3f a clock and SM "
              "(at the %d MHz max clock), %.0f dense-equivalent TFLOP/s\n",
              kSparse ? "mma.sp m16n8k32" : "mma.sync m16n8k16", kChains, us, mmas_per_sm / cycles,
              clock_khz / 1000, 2.0 * 16 * 8 * k * mmas_per_sm * g_sms / (us * 1e-6) / 1e12);
  CHECK_CUDA(cudaFree(out));
}

// --fixed: where a small layer's time goes at M = 1, with the production
// M = 1 tile (256 x 128, 8 warps). Time against bytes along K and along N
// (the intercept is the fixed cost of a call); against the grid (fewer,
// longer stripes, so fewer blocks share each n-tile's reduction); with the
// math skipped (loads-only); with the weights L2-resident; and an empty
// kernel of the same grid, the launch floor. First, the mma.sync rate
// (what bounds M >= 32).
static void fixed_costs(const Buffers& b) {
  const float empty_us = median_us_per_call(
      [&](int, cudaStream_t stream) {
        empty_kernel<<<g_sms, 256, 0, stream>>>();
        CHECK_CUDA(cudaGetLastError());
      },
      200);
  std::printf("empty kernel, %d x 256 threads: %.2f us a call\n", g_sms, empty_us);
  mma_rate<16>();
  mma_rate<32>();
  mma_rate<16, true>();
  const int shapes[][2] = {{1024, 4096}, {2048, 4096}, {4096, 4096}, {8192, 4096}, {16384, 4096},
                           {4096, 1024}, {4096, 2048}, {4096, 8192}, {4096, 16384}};
  using Tile = TileShape<1, 8, 16, 8, true>;
  for (auto& s : shapes) {
    Layer layer = make_layer(s[0], s[1]);
    for (int divisor : {1, 2, 4, 8}) {
      g_grid_divisor = divisor;
      char name[64];
      std::snprintf(name, sizeof(name), "r1 n8 k16 w8 grid/%d", divisor);
      time_tile<Tile>(name, layer, b, 1);
    }
    g_grid_divisor = 1;
    time_tile<TileShape<1, 8, 16, 8, true, 1, 1, true>>("r1 n8 k16 w8 loads-only", layer, b, 1,
                                                        true, true);
    time_tile<Tile>("r1 n8 k16 w8 L2-resident", layer, b, 1, false);
    free_layer(layer);
  }
}

#ifdef JAX_MARLIN_PHASES
// --phases (probe build, -DJAX_MARLIN_PHASES): one call's timeline at M = 1
// with the production tile. For each phase, the spread over blocks of its
// %globaltimer stamp after the first block's entry; then, per block, the SM
// cycles between phases (medians over blocks). Weights from HBM (the copy
// timed is not the last one the warm-up used).
static double median_of(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
static void phase_report(const Buffers& b, int k, int n) {
  using Tile = TileShape<1, 8, 16, 8, true>;
  Layer layer = make_layer(k, n);
  CHECK_CUDA(cudaFuncSetAttribute(kernel_of<Tile>(), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Tile::kSmemBytes));
  const int n_tiles = n / Tile::kTileN;
  const int total = (k / Tile::kTileK) * n_tiles;
  const int stripes = stripe_count(total, n_tiles, std::min(g_sms * Tile::kBlocksPerSM, kPhaseBlocks));
  const int copies = static_cast<int>(layer.packed.size());
  MarlinParams<half> p;
  p.x = static_cast<const half*>(b.x);
  p.y = static_cast<half*>(b.y);
  p.workspace = b.workspace;
  p.locks = b.locks;
  p.rows = 1;
  p.k = k;
  p.n = n;
  p.group_shift = 7;
  p.stripes = stripes;
  p.overlapped = false;  // a plain launch
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  void* ns_addr = nullptr;
  void* clk_addr = nullptr;
  CHECK_CUDA(cudaGetSymbolAddress(&ns_addr, g_phase_ns));
  CHECK_CUDA(cudaGetSymbolAddress(&clk_addr, g_phase_clk));
  for (int rep = 0; rep < 2 * copies + 1; ++rep) {
    const bool last = rep == 2 * copies;
    if (last) {
      CHECK_CUDA(cudaMemset(ns_addr, 0, sizeof(g_phase_ns)));
      CHECK_CUDA(cudaMemset(clk_addr, 0, sizeof(g_phase_clk)));
      CHECK_CUDA(cudaEventRecord(start));
    }
    p.packed = static_cast<const int4*>(layer.packed[rep % copies]);
    p.scales = static_cast<const half*>(layer.scales[rep % copies]);
    marlin_kernel<half, Tile><<<stripes, Tile::kThreads, Tile::kSmemBytes>>>(p);
    CHECK_CUDA(cudaGetLastError());
    if (last) CHECK_CUDA(cudaEventRecord(stop));
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  float event_ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&event_ms, start, stop));
  std::vector<unsigned long long> ns(static_cast<size_t>(kPhaseBlocks) * kPhases);
  std::vector<long long> clk(ns.size());
  CHECK_CUDA(cudaMemcpy(ns.data(), ns_addr, ns.size() * sizeof(ns[0]), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(clk.data(), clk_addr, clk.size() * sizeof(clk[0]), cudaMemcpyDeviceToHost));
  auto at = [&](int blk, int ph) { return ns[static_cast<size_t>(blk) * kPhases + ph]; };
  auto cyc = [&](int blk, int ph) { return clk[static_cast<size_t>(blk) * kPhases + ph]; };
  unsigned long long t0 = ~0ull;
  for (int blk = 0; blk < stripes; ++blk) t0 = std::min(t0, at(blk, kEntry));
  static const char* names[kPhases] = {"entry", "set up", "prologue issued", "first stage landed",
                                       "last tile computed", "tile reduced (last arriver)", "exit"};
  std::printf("%6d x %-6d M = 1, %d blocks, %d iterations a block, event time %.2f us\n", k, n, stripes,
              total / stripes, event_ms * 1e3);
  for (int ph = 0; ph < kPhases; ++ph) {
    std::vector<double> t;
    for (int blk = 0; blk < stripes; ++blk)
      if (at(blk, ph) != 0) t.push_back((at(blk, ph) - t0) * 1e-3);
    if (t.empty()) continue;
    std::sort(t.begin(), t.end());
    std::printf("  %-28s blocks %4zu   min %7.2f  median %7.2f  max %7.2f us after the first entry\n",
                names[ph], t.size(), t.front(), t[t.size() / 2], t.back());
  }
  const int spans[][2] = {{kEntry, kSetUp}, {kSetUp, kPrologueIssued}, {kPrologueIssued, kFirstStage},
                          {kFirstStage, kLastCompute}, {kLastCompute, kExit}};
  for (auto& sp : spans) {
    std::vector<double> d;
    for (int blk = 0; blk < stripes; ++blk)
      if (cyc(blk, sp[0]) != 0 && cyc(blk, sp[1]) != 0) d.push_back(double(cyc(blk, sp[1]) - cyc(blk, sp[0])));
    std::printf("  cycles %-20s -> %-20s median %8.0f\n", names[sp[0]], names[sp[1]], median_of(d));
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  free_layer(layer);
}
#endif

int main(int argc, char** argv) {
  CHECK_CUDA(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  // The 70B layers and the 7B ones whose K fits 512-row k-tiles.
  const int shapes[][2] = {{4096, 4096},  {4096, 12288}, {4096, 22016},
                           {8192, 8192},  {8192, 28672}, {28672, 8192}};
  Buffers b;
  CHECK_CUDA(cudaMalloc(&b.x, size_t{128} * 28672 * 2));
  CHECK_CUDA(cudaMalloc(&b.y, size_t{128} * 28672 * 2));
  CHECK_CUDA(cudaMalloc(&b.y_ref, size_t{128} * 28672 * 2));
  CHECK_CUDA(cudaMalloc(&b.ref_locks, 4096 * sizeof(int)));
  // Two partial-sum slots a block, for the largest tile swept (128 x 512).
  CHECK_CUDA(cudaMalloc(&b.workspace, size_t{2} * 2 * g_sms * 128 * 512 * 4));
  CHECK_CUDA(cudaMalloc(&b.locks, 4096 * sizeof(int)));
  CHECK_CUDA(cudaMemset(b.locks, 0, 4096 * sizeof(int)));
  fill_halves<<<1024, 256>>>(static_cast<half*>(b.x), size_t{128} * 28672, -1.f, 1.f, 1);

  g_bw = copy_bandwidth();
  std::printf("copy bandwidth (read + write): %.3f TB/s\n", g_bw / 1e12);
  // The lock memset alone, as launched before every call.
  const float memset_us = median_us_per_call(
      [&](int, cudaStream_t stream) { CHECK_CUDA(cudaMemsetAsync(b.locks, 0, 128 * sizeof(int), stream)); },
      200);
  std::printf("lock memset alone: %.2f us a call (not in the rows below)\n", memset_us);

  if (argc == 2 && std::strcmp(argv[1], "--fixed") == 0) {
    fixed_costs(b);
    return 0;
  }
#ifdef JAX_MARLIN_PHASES
  if (argc == 2 && std::strcmp(argv[1], "--phases") == 0) {
    const int layers[][2] = {{4096, 4096}, {8192, 8192}, {8192, 28672}, {28672, 8192}};
    for (auto& l : layers) phase_report(b, l[0], l[1]);
    return 0;
  }
#endif
  // --wide: 512-column wgmma tiles (x by TMA) against the production ones
  // (listed first) at M = 32 / 64 / 128: a 512-column tile reads x from L2
  // once for twice the weight bytes of a 256-column one: two warpgroups
  // with four slabs each (128 accumulators a thread at M = 64); at M = 128,
  // 256 columns (two slabs a warpgroup, 128 accumulators). (Four
  // warpgroups of two slabs, 512 threads at 128 registers, spilled and were
  // slowest of all, session 19.)
  // "producer" rows: the tiles with a producer warp (the production form
  // of the wgmma tiles), each next to its cp.async form.
  if (argc == 2 && std::strcmp(argv[1], "--wide") == 0) {
    for (auto& s : shapes) {
      Layer layer = make_layer(s[0], s[1]);
      for (int m : {32}) {
        SWEEPWT(4, 16, 8, 8);
        SWEEPWTP(4, 16, 8, 8);
        SWEEPWTR(4, 16, 8, 8);
        SWEEPWT(4, 32, 4, 8);
        SWEEPWT(4, 32, 8, 8);
        SWEEPWTP(4, 32, 8, 8);
        SWEEPWTR(4, 32, 8, 8);
      }
      for (int m : {64}) {
        SWEEPWT(8, 16, 8, 8);
        SWEEPWTP(8, 16, 8, 8);
        SWEEPWTR(8, 16, 8, 8);
        SWEEPWT(8, 32, 4, 8);
        SWEEPWT(8, 32, 8, 8);
        time_tile<TileShape<8, 16, 8, 8, true, 1, 1, true, true, 1, true>>(
            "r8 n16 k8 w8 wgmma tma-x loads-only", layer, b, m, true, true);
        time_tile<ProducerWarp<TileShape<8, 16, 8, 8, true, 1, 1, true, true, 1, true>>>(
            "r8 n16 k8 w8 wgmma tma-x producer loads-only", layer, b, m, true, true);
        time_tile<TileShape<8, 32, 4, 8, true, 1, 1, true, true, 1, true>>(
            "r8 n32 k4 w8 wgmma tma-x loads-only", layer, b, m, true, true);
      }
      for (int m : {128}) {
        SWEEPWT(16, 8, 8, 8);
        SWEEPWTP(16, 8, 8, 8);
        SWEEPWTR(16, 8, 8, 8);
        SWEEPWT(16, 16, 8, 8);
        SWEEPWT(16, 16, 4, 8);
      }
      free_layer(layer);
    }
    return 0;
  }
  for (auto& s : shapes) {
    if (argc == 3 && (std::atoi(argv[1]) != s[0] || std::atoi(argv[2]) != s[1])) continue;
    Layer layer = make_layer(s[0], s[1]);
    // Longer k-tiles (fewer barriers and stage switches per byte) against
    // the production tiles (listed first in each group; the M = 1 loop is
    // latency-bound). Earlier sweeps: w16 at 1 block/SM, x2/SM and wgmma
    // lost at M <= 32; the M = 64 / 128 rows are in sweeps/ of session 6.
    for (int m : {1, 8}) {
      SWEEP(1, 8, 16, 8);
      SWEEP(1, 16, 8, 8);
      SWEEP(1, 8, 32, 8);
      SWEEP(1, 4, 32, 8);
      SWEEP(1, 16, 16, 8);
      SWEEP(1, 4, 64, 8);
      SWEEP(1, 8, 32, 16);
      SWEEP(1, 16, 16, 16);
      SWEEPT(1, 16, 16, 8);
    }
    for (int m : {16}) {
      SWEEP(2, 16, 8, 8);
      SWEEP(2, 8, 16, 8);
      SWEEP(2, 8, 32, 8);
      SWEEP(2, 16, 16, 8);
      SWEEP(2, 8, 32, 16);
      SWEEP(2, 16, 16, 16);
      SWEEPT(2, 16, 16, 8);
    }
    for (int m : {32}) {
      SWEEP(4, 16, 8, 8);
      SWEEP(4, 8, 16, 8);
      SWEEP(4, 16, 16, 8);
      SWEEP(4, 8, 32, 8);
      // wgmma: still behind mma.sync (session 14, H100, 8192^2: M = 32
      // 37.5 vs 27.7 us, M = 64 54.5 vs 44.1; NOTES.md has the ncu).
      SWEEPW(4, 8, 8, 8);
      SWEEPW(4, 4, 16, 8);
      SWEEPW(4, 8, 16, 8);
      // 256 columns a tile, two slabs a warpgroup: half the x bytes per weight byte.
      SWEEPW(4, 16, 8, 8);
      SWEEPW(4, 16, 4, 8);
      SWEEPJ2(4, 16, 8, 8);
      SWEEPWT(4, 16, 8, 8);
      SWEEPWT(4, 8, 8, 8);
      SWEEPT(4, 16, 8, 8);
      // Is M = 32 bound by its memory pipeline (x re-read from L2 for every
      // n-tile) or by the math? The production tile without the math:
      time_tile<TileShape<4, 16, 8, 8, true, 1, 1, true>>("r4 n16 k8 w8 loads-only", layer, b, m,
                                                          true, true);
    }
    for (int m : {64}) {
      SWEEPM2(8, 16, 8, 8);  // production until session 15 (row split)
      // Fit only a larger shared-memory budget (-DJAX_MARLIN_SMEM_BUDGET_KB=224).
      SWEEPM2(8, 16, 16, 8);
      SWEEPM2(8, 8, 16, 8);
      SWEEPW(8, 8, 8, 8);
      SWEEPW(8, 4, 16, 8);
      SWEEPW(8, 8, 16, 8);
      SWEEPW(8, 8, 4, 8);
      SWEEPW(8, 16, 8, 8);
      SWEEPW(8, 16, 4, 8);
      // The M split dequantizes each weight in both warps of a slab; the
      // column split does it once (same 64 accumulators a warp).
      SWEEPJ2(8, 16, 8, 8);  // production; profile64 picks it by name
      SWEEPJ2(8, 8, 16, 8);
      SWEEPJ2(8, 16, 4, 8);
      // x by TMA (one thread, 16 copies a stage) instead of 4 cp.async a
      // thread: ncu has the wgmma tiles waiting on the LSU for those.
      SWEEPWT(8, 16, 8, 8);
      SWEEPWT(8, 8, 8, 8);
      SWEEPWT(8, 16, 4, 8);
      time_tile<TileShape<8, 16, 8, 8, true, 1, 1, true, true>>("r8 n16 k8 w8 wgmma loads-only",
                                                                layer, b, m, true, true);
      time_tile<TileShape<8, 16, 8, 8, true, 1, 1, true, true, 1, true>>(
          "r8 n16 k8 w8 wgmma tma-x loads-only", layer, b, m, true, true);
      // The production M = 64 tile with x by TMA, and both without the math.
      SWEEPJ2T(8, 16, 8, 8);
      time_tile<TileShape<8, 16, 8, 8, true, 1, 1, true, false, 2>>("r8 n16 k8 w8 jsplit2 loads-only",
                                                                    layer, b, m, true, true);
      time_tile<TileShape<8, 16, 8, 8, true, 1, 1, true, false, 2, true>>(
          "r8 n16 k8 w8 jsplit2 tma-x loads-only", layer, b, m, true, true);
      // The same question at M = 64, for the production tile and the wgmma
      // one (whose stage carries twice the x bytes per weight byte); and the
      // production tile with its weights L2-resident (no HBM).
      time_tile<TileShape<8, 16, 8, 8, true, 1, 2, true>>("r8 n16 k8 w8 msplit2 loads-only", layer,
                                                          b, m, true, true);
      time_tile<TileShape<8, 8, 8, 8, true, 1, 1, true, true>>("r8 n8 k8 w8 wgmma loads-only",
                                                               layer, b, m, true, true);
      time_tile<TileShape<8, 16, 8, 8, true, 1, 2>>("r8 n16 k8 w8 msplit2 L2-resident", layer, b, m,
                                                    false);
    }
    for (int m : {128}) {
      SWEEPM2(16, 16, 8, 8);  // production until session 15 (row split)
      SWEEPJ2(16, 16, 8, 8);  // production (128 x 256, one pass of 128 rows)
      SWEEPJ2T(16, 16, 8, 8);
      SWEEPJ2(16, 16, 4, 8);
      // wgmma at 128 rows: each dequantized weight feeds one m64n128k16
      // (M = 128 as two 64-row chunks on the wgmma tile dequantizes every
      // weight twice). n8: a slab a warpgroup, 64 accumulators a thread
      // (196 registers, no spills); n16: two slabs, 128 accumulators and
      // half the x bytes per weight byte, but 255 registers and spills
      // (ptxas 13.0: 540 bytes stored, 424 loaded; loop invariants, about
      // 20 local loads a stage), as the production tile's (464 / 340).
      SWEEPWT(16, 8, 8, 8);
      SWEEPWT(16, 8, 4, 8);
      SWEEPWT(16, 16, 8, 8);
      // Their memory pipelines alone, against the production tile's.
      time_tile<TileShape<16, 8, 8, 8, true, 1, 1, true, true, 1, true>>(
          "r16 n8 k8 w8 wgmma tma-x loads-only", layer, b, m, true, true);
      time_tile<TileShape<16, 16, 8, 8, true, 1, 1, true, true, 1, true>>(
          "r16 n16 k8 w8 wgmma tma-x loads-only", layer, b, m, true, true);
      time_tile<TileShape<16, 16, 8, 8, true, 1, 1, true, false, 2, true>>(
          "r16 n16 k8 w8 jsplit2 tma-x loads-only", layer, b, m, true, true);
    }
    {
      // Where the M = 1 time goes: weights in L2 (no HBM), the pipeline
      // without the math, the math without group scales.
      time_tile<TileShape<1, 8, 8, 8, true>>("r1 n8 k8 w8 L2-resident", layer, b, 1, false);
      time_tile<TileShape<1, 8, 8, 8, true, 1, 1, true>>("r1 n8 k8 w8 loads-only", layer, b, 1,
                                                         true, true);
      time_tile<TileShape<1, 8, 8, 8, true, 2, 1, true>>("r1 n8 k8 w8 x2/SM loads-only", layer, b,
                                                         1, true, true);
      time_tile<TileShape<1, 16, 8, 8, true, 1, 1, true>>("r1 n16 k8 w8 loads-only", layer, b, 1,
                                                          true, true);
      time_tile<TileShape<1, 8, 8, 8, false>>("r1 n8 k8 w8 per-channel", layer, b, 1, true, true);
    }
    free_layer(layer);
  }
  return 0;
}
