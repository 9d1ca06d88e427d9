// Tuning tool for the 2:4 sparse kernel: times candidate tiles directly
// (bypassing sparse_dispatch.cu's table), x by TMA, on Llama-sized layers,
// fp16 and bf16, group 128 and per-channel, and checks each against the
// production launcher (sparse_matmul) on the same operands: "same" or
// "MISMATCH" (max |y - y_ref| / max |y_ref|, threshold 1e-2). Built for
// sm_90a (scripts/build_tools.sh SRC OUT "" sparse_sweep); needs a Hopper GPU.
//
//   ./sparse_tile_sweep            every layer, M = 32, 64, 128
//   ./sparse_tile_sweep K N [M]    one layer (e.g. under compute-sanitizer)
//
// JAX_MARLIN_SWEEP_ONLY=<text>: only the rows whose name contains it.
// Rows: "prod" is the production tile of that M, launched directly (its
// time is the launcher's less the lock memset); "wgmma" rows are the
// SparseTileShape::kWgmma candidates (wgmma.mma_async.sp, sm_90a).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cuda/launch_util.h"
#include "cuda/marlin_launch.h"
#include "cuda/sparse_kernel.cuh"
#include "cuda/sparse_launch.h"
#include "cuda_test_util.h"
#include "device_fill.cuh"

using namespace jax_marlin::cuda;

// Metadata words: 8 nibbles, each two distinct increasing positions 0..3
// (low 2 bits: kept 0, high 2 bits: kept 1), the only values the format has.
__global__ void fill_meta(uint32_t* out, size_t n, uint32_t seed) {
  constexpr uint32_t kPairs[6] = {0x4, 0x8, 0xc, 0x9, 0xd, 0xe};
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    uint32_t h = hash_u32(static_cast<uint32_t>(i) * 2654435761u + seed), w = 0;
    for (int q = 0; q < 8; ++q) {
      w |= kPairs[h % 6] << (4 * q);
      h = h / 6 + hash_u32(h + q);
    }
    out[i] = w;
  }
}
template <typename T>
__global__ void fill_t(T* out, size_t n, float lo, float hi, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    const float v = lo + (hi - lo) * (hash_u32(static_cast<uint32_t>(i) + seed) % 4096) / 4096.f;
    if constexpr (std::is_same_v<T, half>) {
      out[i] = __float2half(v);
    } else {
      out[i] = __float2bfloat16(v);
    }
  }
}

struct Layer {
  int k, n;
  void *values, *meta, *scales_g, *scales_c;  // group 128 and per-channel scales
};

static Layer make_layer(int k, int n) {
  Layer l{k, n, nullptr, nullptr, nullptr, nullptr};
  const size_t v_words = size_t(k / 32) * 2 * n, m_words = size_t(k / 32) * n;
  CHECK_CUDA(cudaMalloc(&l.values, v_words * 4));
  CHECK_CUDA(cudaMalloc(&l.meta, m_words * 4));
  CHECK_CUDA(cudaMalloc(&l.scales_g, size_t(k / 128) * n * 2));
  CHECK_CUDA(cudaMalloc(&l.scales_c, size_t(n) * 2));
  fill_words<<<1024, 256>>>(static_cast<uint32_t*>(l.values), v_words, 77);
  fill_meta<<<1024, 256>>>(static_cast<uint32_t*>(l.meta), m_words, 78);
  CHECK_CUDA(cudaGetLastError());
  return l;
}
static void free_layer(Layer& l) {
  CHECK_CUDA(cudaFree(l.values));
  CHECK_CUDA(cudaFree(l.meta));
  CHECK_CUDA(cudaFree(l.scales_g));
  CHECK_CUDA(cudaFree(l.scales_c));
}

struct Buffers {
  void *x, *y, *y_ref;
  float* workspace;
  int *locks, *ref_locks;
};

template <typename T>
static float to_f(T v) {
  if constexpr (std::is_same_v<T, half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
static double max_rel_diff(const Buffers& b, int m, int n) {
  std::vector<T> y(static_cast<size_t>(m) * n), ref(y.size());
  CHECK_CUDA(cudaMemcpy(y.data(), b.y, y.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(ref.data(), b.y_ref, ref.size() * 2, cudaMemcpyDeviceToHost));
  double diff = 0, scale = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double a = to_f(y[i]), r = to_f(ref[i]);
    if (!(std::abs(a - r) <= diff)) diff = std::abs(a - r);  // NaN-propagating max
    scale = std::max(scale, std::abs(r));
  }
  return scale > 0 ? diff / scale : diff;
}

static int g_sms = 0;
static double g_bw = 3.35e12;  // H100 SXM HBM3 peak, for the roofline column only

// One candidate on one layer, dtype and scale kind; rows <= Tile::kTileM.
template <typename T, typename Tile>
static void run_tile(const char* name, const Layer& l, const Buffers& b, int m, bool grouped) {
  if (l.k % Tile::kTileK || l.n % Tile::kTileN) return;
  if (const char* only = std::getenv("JAX_MARLIN_SWEEP_ONLY"); only && !std::strstr(name, only)) return;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const char* kind = grouped ? "g128" : "chan";
  if constexpr (!Tile::kFits) {
    std::printf("%6d %6d %4d %s %s  %-30s does not fit shared memory\n", l.k, l.n, m, bf16 ? "bf16" : "fp16",
                kind, name);
  } else {
    const auto kernel = &sparse_kernel_tma_x<T, Tile>;
    CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes));
    int resident = 0;
    CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, Tile::kBlockThreads, Tile::kSmemBytes));
    if (resident < 1) {
      std::printf("%6d %6d %4d %s %s  %-30s not resident: skipped\n", l.k, l.n, m, bf16 ? "bf16" : "fp16", kind, name);
      return;
    }
    const void* scales = grouped ? l.scales_g : l.scales_c;
    const int group = grouped ? 128 : l.k;
    alignas(64) CUtensorMap x_map;
    CHECK_CUDA(encode_x_tensor_map(&x_map, b.x, m, l.k, Tile::kXBoxK, Tile::kTileM, true));
    const int n_tiles = l.n / Tile::kTileN;
    const int total = (l.k / Tile::kTileK) * n_tiles;
    CHECK_CUDA(cudaMemset(b.locks, 0, sizeof(int) * (l.n / 64)));
    const float us = median_us_per_call(
        [&](int, cudaStream_t stream) {
          SparseParams<T> p;
          p.x = static_cast<const T*>(b.x);
          p.values = static_cast<const int4*>(l.values);
          p.meta = static_cast<const int4*>(l.meta);
          p.scales = static_cast<const T*>(scales);
          p.y = static_cast<T*>(b.y);
          p.workspace = b.workspace;
          p.locks = b.locks;  // zeroed above; the kernel leaves them zeroed
          p.rows = m;
          p.k = l.k;
          p.n = l.n;
          p.group_shift = Tile::kGrouped ? 7 : 0;
          p.stripes = stripe_count(total, n_tiles, g_sms);
          p.overlapped = false;
          sparse_kernel_tma_x<T, Tile><<<p.stripes, Tile::kBlockThreads, Tile::kSmemBytes, stream>>>(p, x_map);
          CHECK_CUDA(cudaGetLastError());
        },
        8);
    SparseProblem ref{bf16 ? ActDtype::kBFloat16 : ActDtype::kFloat16, b.x, l.values, l.meta, scales, b.y_ref,
                      b.workspace, b.ref_locks, false, m, l.k, l.n, group};
    CHECK_CUDA(sparse_matmul(ref, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const double diff = max_rel_diff<T>(b, m, l.n);
    const double bytes = l.k * double(l.n) * 3 / 8 + (grouped ? l.k / 128.0 : 1.0) * l.n * 2 + 2.0 * m * (l.k + l.n);
    std::printf("%6d %6d %4d %s %s  %-30s stages=%d smem=%3dKB  %8.2f us  %6.1f%% of roofline  %s (%.1e)\n", l.k,
                l.n, m, bf16 ? "bf16" : "fp16", kind, name, Tile::kStages, Tile::kSmemBytes / 1024, us,
                100.0 * bytes / g_bw / (us * 1e-6), diff <= 1e-2 ? "same" : "MISMATCH", diff);
  }
}

// RB 8-row blocks, NB n16 blocks (tile n = 16 NB), BANDS k32 bands (tile k =
// 32 BANDS), W warps; production rows split runs by rows at RB >= 8.
#define PROD(RB, NB, BANDS, W)                                                                              \
  run_tile<T, SparseTileShape<RB, NB, BANDS, W, G, slab_sharing_warps(RB), true>>(                       \
      "r" #RB " n" #NB " b" #BANDS " w" #W " prod", l, b, m, G)
#define WG(RB, NB, BANDS, W)                                                                                \
  run_tile<T, SparseTileShape<RB, NB, BANDS, W, G, 1, true, true>>("r" #RB " n" #NB " b" #BANDS " w" #W " wgmma", \
                                                                  l, b, m, G)

template <typename T, bool G>
static void sweep_layer(const Layer& l, const Buffers& b, int m) {
  fill_t<T><<<1024, 256>>>(static_cast<T*>(b.x), size_t(m) * l.k, -1.f, 1.f, 5);
  fill_t<T><<<1024, 256>>>(static_cast<T*>(G ? l.scales_g : l.scales_c), size_t(G ? l.k / 128 : 1) * l.n, 1e-3f,
                           1e-2f, 99);
  CHECK_CUDA(cudaGetLastError());
  if (m <= 32) {
    PROD(4, 16, 4, 8);  // production at 17-32 rows (sparse_dispatch.cu: config 1)
    WG(4, 16, 4, 8);    // 2 warpgroups x 2 runs, k128
    WG(4, 8, 8, 8);     // 2 warpgroups x 1 run, k256
    WG(4, 16, 8, 8);    // 2 warpgroups x 2 runs, k256
    WG(4, 16, 4, 4);    // 1 warpgroup x 4 runs
    WG(4, 4, 8, 8);     // 1 run, the 2 warpgroups split K (shared-memory reduction)
  } else if (m <= 64) {
    PROD(8, 16, 4, 8);  // production at 33-64 rows
    WG(8, 16, 4, 8);    // 2 warpgroups x 2 runs (64 accumulators a thread), k128
    WG(8, 8, 8, 8);     // 2 warpgroups x 1 run, k256
    WG(8, 8, 4, 8);     // 2 warpgroups x 1 run, k128
    WG(8, 16, 4, 4);    // 1 warpgroup x 4 runs (128 accumulators)
    WG(8, 32, 2, 8);    // 2 warpgroups x 4 runs, k64
    WG(8, 4, 8, 8);     // 1 run, the 2 warpgroups split K (shared-memory reduction)
  } else {
    PROD(16, 16, 4, 8);  // production at 97-128 rows
    WG(16, 16, 4, 8);    // 2 warpgroups x 2 runs (128 accumulators a thread)
    WG(16, 8, 4, 8);     // 2 warpgroups x 1 run
    WG(16, 8, 8, 8);     // 2 warpgroups x 1 run, k256
  }
}

int main(int argc, char** argv) {
  CHECK_CUDA(cudaSetDevice(0));
  g_sms = multiprocessor_count();
  std::vector<std::pair<int, int>> layers = {{4096, 4096}, {8192, 8192}, {8192, 28672}, {28672, 8192}};
  std::vector<int> ms = {32, 64, 128};
  if (argc >= 3) layers = {{std::atoi(argv[1]), std::atoi(argv[2])}};
  if (argc >= 4) ms = {std::atoi(argv[3])};
  int max_k = 0, max_n = 0;
  for (auto [k, n] : layers) max_k = std::max(max_k, k), max_n = std::max(max_n, n);
  Buffers b{};
  CHECK_CUDA(cudaMalloc(&b.x, size_t(128) * max_k * 2));
  CHECK_CUDA(cudaMalloc(&b.y, size_t(128) * max_n * 2));
  CHECK_CUDA(cudaMalloc(&b.y_ref, size_t(128) * max_n * 2));
  size_t ws = 0;
  for (auto [k, n] : layers) ws = std::max(ws, sparse_workspace_floats(128, k, n));
  // Candidates' grids are at most one block an SM too: two slots a block of
  // the largest tile (128 x 512).
  ws = std::max(ws, size_t(2) * g_sms * 128 * 512);
  CHECK_CUDA(cudaMalloc(&b.workspace, ws * 4));
  CHECK_CUDA(cudaMalloc(&b.locks, lock_count(128, max_n) * sizeof(int)));
  CHECK_CUDA(cudaMalloc(&b.ref_locks, lock_count(128, max_n) * sizeof(int)));
  std::printf("%6s %6s %4s %s %s  %-30s\n", "K", "N", "M", "type", "scal", "tile");
  for (auto [k, n] : layers) {
    Layer l = make_layer(k, n);
    for (int m : ms) {
      sweep_layer<half, true>(l, b, m);
      sweep_layer<half, false>(l, b, m);
      sweep_layer<__nv_bfloat16, true>(l, b, m);
    }
    free_layer(l);
  }
  return 0;
}
