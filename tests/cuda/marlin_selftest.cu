// Standalone check of the CUDA launcher, independent of JAX: packs random
// codes with the host-side layout tables, runs marlin_matmul and compares with
// an fp64 host reference. Small enough to run under compute-sanitizer.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/marlin_selftest.cu \
//        csrc/cuda/marlin_dispatch.cu -o selftest && ./selftest
//
// `./selftest --bench` instead times the launcher alone (CUDA events, weights
// rotated through 4x the L2) against a device-to-device copy: the quickest
// loop for kernel tuning, with no JAX in the way. `--quick`: a small subset,
// for compute-sanitizer; `--chains`: only the back-to-back chains.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/float16.h"
#include "common/marlin_layout.h"
#include "cuda/marlin_launch.h"
#include "cuda_test_util.h"

using namespace jax_marlin;

struct Case {
  int m, k, n, group;  // group == k: per-channel
  bool bf16;
};

static uint16_t to_bits(float v, bool bf16) { return bf16 ? FloatToBf16(v) : FloatToHalf(v); }
static float from_bits(uint16_t b, bool bf16) { return bf16 ? Bf16ToFloat(b) : HalfToFloat(b); }

// Returns relative error ||y - ref|| / ||ref||, or a large value on failure:
// 1e9 NaN/inf, 2e9 repeats not bit-identical, 3e9 locks not left at zero.
static double run_case(const Case& c, std::mt19937& rng, int repeats) {
  const bool bf16 = c.bf16;
  const int groups = c.k / c.group;
  std::uniform_int_distribution<int> code_dist(0, 15);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> scale_dist(0.002f, 0.02f);

  std::vector<uint8_t> codes(static_cast<size_t>(c.k) * c.n);
  for (auto& v : codes) v = static_cast<uint8_t>(code_dist(rng));
  std::vector<uint16_t> scales(static_cast<size_t>(groups) * c.n);  // unpermuted
  for (auto& v : scales) v = to_bits(scale_dist(rng), bf16);
  std::vector<uint16_t> x(static_cast<size_t>(c.m) * c.k);
  for (auto& v : x) v = to_bits(normal(rng), bf16);

  // Pack (FORMAT.md): per band of 16 rows and run of 64 columns, packed value
  // i is the code at band-tile position dest[i].
  const auto dest = MarlinWeightUnpermute();
  std::vector<uint32_t> packed(static_cast<size_t>(c.k / 16) * 2 * c.n, 0u);
  for (int band = 0; band < c.k / 16; ++band)
    for (int run = 0; run < c.n / 64; ++run)
      for (int i = 0; i < kRunValues; ++i) {
        const int r = dest[i] / 64, col = dest[i] % 64;
        const uint32_t code = codes[static_cast<size_t>(band * 16 + r) * c.n + run * 64 + col];
        packed[static_cast<size_t>(band) * 2 * c.n + run * 128 + i / 8] |= code << (4 * (i % 8));
      }
  std::vector<uint16_t> scales_perm(scales.size());
  const bool per_channel = groups == 1;
  const int run_len = per_channel ? 32 : 64;
  const auto gi = MarlinGroupedScaleInverse();
  const auto pi = MarlinPerChannelScaleInverse();
  for (size_t base = 0; base < scales.size(); base += run_len)
    for (int b = 0; b < run_len; ++b)
      scales_perm[base + (per_channel ? pi[b] : gi[b])] = scales[base + b];

  // fp64 reference on W_hat rounded to the activation dtype.
  std::vector<double> ref(static_cast<size_t>(c.m) * c.n, 0.0);
  std::vector<float> wrow(c.n);
  for (int kk = 0; kk < c.k; ++kk) {
    for (int nn = 0; nn < c.n; ++nn) {
      const float s = from_bits(scales[static_cast<size_t>(kk / c.group) * c.n + nn], bf16);
      wrow[nn] = from_bits(to_bits((codes[static_cast<size_t>(kk) * c.n + nn] - 8) * s, bf16), bf16);
    }
    for (int mm = 0; mm < c.m; ++mm) {
      const double xv = from_bits(x[static_cast<size_t>(mm) * c.k + kk], bf16);
      double* r = &ref[static_cast<size_t>(mm) * c.n];
      for (int nn = 0; nn < c.n; ++nn) r[nn] += xv * wrow[nn];
    }
  }

  void *dx, *dp, *ds, *dy;
  float* dws;
  int* dlocks;
  CHECK_CUDA(cudaMalloc(&dx, x.size() * 2));
  CHECK_CUDA(cudaMalloc(&dp, packed.size() * 4));
  CHECK_CUDA(cudaMalloc(&ds, scales_perm.size() * 2));
  CHECK_CUDA(cudaMalloc(&dy, static_cast<size_t>(c.m) * c.n * 2));
  CHECK_CUDA(cudaMalloc(&dws, cuda::workspace_floats(c.m, c.k, c.n) * 4));
  CHECK_CUDA(cudaMalloc(&dlocks, cuda::lock_count(c.m, c.n) * 4));
  CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dp, packed.data(), packed.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(ds, scales_perm.data(), scales_perm.size() * 2, cudaMemcpyHostToDevice));
  // Poison output, workspace and locks: the launcher must not rely on zeros.
  CHECK_CUDA(cudaMemset(dy, 0xff, static_cast<size_t>(c.m) * c.n * 2));
  CHECK_CUDA(cudaMemset(dws, 0x7f, cuda::workspace_floats(c.m, c.k, c.n) * 4));
  CHECK_CUDA(cudaMemset(dlocks, 0x55, cuda::lock_count(c.m, c.n) * 4));

  // First call resets the poisoned locks; later ones rely on the kernel
  // leaving them at zero (as the FFI handler's persistent buffer does).
  cuda::MarlinProblem p{bf16 ? cuda::ActDtype::kBFloat16 : cuda::ActDtype::kFloat16, dx, dp, ds, dy,
                        dws, dlocks, false, c.m, c.k, c.n, c.group};
  std::vector<uint16_t> y(static_cast<size_t>(c.m) * c.n), first;
  double worst = 0;
  for (int rep = 0; rep < repeats; ++rep) {
    CHECK_CUDA(cuda::marlin_matmul(p, nullptr));
    p.locks_zeroed = true;
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost));
    double num = 0, den = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      const double v = from_bits(y[i], bf16);
      if (!std::isfinite(v)) return 1e9;
      num += (v - ref[i]) * (v - ref[i]);
      den += ref[i] * ref[i];
    }
    worst = std::fmax(worst, std::sqrt(num / den));
    if (rep == 0) first = y;
    else if (std::memcmp(first.data(), y.data(), y.size() * 2) != 0) return 2e9;  // nondeterministic
  }
  // The kernel must leave its locks at zero (the persistent-buffer contract).
  std::vector<int> locks_after(cuda::lock_count(c.m, c.n));
  CHECK_CUDA(cudaMemcpy(locks_after.data(), dlocks, locks_after.size() * 4, cudaMemcpyDeviceToHost));
  for (int v : locks_after)
    if (v != 0) return 3e9;
  cudaFree(dx), cudaFree(dp), cudaFree(ds), cudaFree(dy), cudaFree(dws), cudaFree(dlocks);
  return worst;
}

// --- back-to-back calls -----------------------------------------------------

// A back-to-back chain (chain_failure in cuda_test_util.h) of an M x K
// activation through a K x K group-128 weight, fp16: fails if a call reads
// x, the workspace or the locks, or writes anything, before its predecessor
// is done.
static bool chain_matches(std::mt19937& rng, int m, int k) {
  constexpr int kGroup = 128;
  std::uniform_int_distribution<uint32_t> bits;
  std::normal_distribution<float> normal(0.f, 1.f);
  // Codes -8..7 (std ~4.6, mean -0.5) times scales of random sign and size
  // ~1 / (4.6 sqrt(K)): a weight of mean 0 that keeps the chain's outputs
  // O(1) (mean |y| ~1.2 after 8 calls, in a numpy model). With positive
  // scales the codes' mean alone would grow them ~sqrt(K) / 9 a call.
  std::uniform_real_distribution<float> scale_dist(0.5f, 1.5f);
  std::bernoulli_distribution negative(0.5);
  std::vector<uint32_t> packed(static_cast<size_t>(k / 16) * 2 * k);
  for (auto& v : packed) v = bits(rng);  // any bits are valid codes
  std::vector<uint16_t> scales(static_cast<size_t>(k / kGroup) * k);
  for (auto& v : scales)
    v = to_bits((negative(rng) ? -1.f : 1.f) * scale_dist(rng) / (4.6f * std::sqrt(float(k))), false);
  std::vector<uint16_t> x(static_cast<size_t>(m) * k);
  for (auto& v : x) v = to_bits(normal(rng), false);

  void *dp, *ds;
  float* ws;
  int* locks;
  CHECK_CUDA(cudaMalloc(&dp, packed.size() * 4));
  CHECK_CUDA(cudaMalloc(&ds, scales.size() * 2));
  CHECK_CUDA(cudaMalloc(&ws, cuda::workspace_floats(m, k, k) * 4));
  CHECK_CUDA(cudaMalloc(&locks, cuda::lock_count(m, k) * 4));
  CHECK_CUDA(cudaMemcpy(dp, packed.data(), packed.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(ds, scales.data(), scales.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(locks, 0, cuda::lock_count(m, k) * 4));
  const char* failure = chain_failure(x, [&](void* in, void* out, cudaStream_t stream) {
    cuda::MarlinProblem p{cuda::ActDtype::kFloat16, in, dp, ds, out, ws, locks, true, m, k, k, kGroup};
    CHECK_CUDA(cuda::marlin_matmul(p, stream));
  });
  cudaFree(dp), cudaFree(ds), cudaFree(ws), cudaFree(locks);
  if (failure) std::printf("FAIL chain m=%d k=n=%d: %s\n", m, k, failure);
  return failure == nullptr;
}

// --- kernel-only timing -----------------------------------------------------

static int bench() {
  constexpr size_t kRotateBytes = size_t{200} << 20;  // 4x the 50 MB L2
  const double bw = copy_bandwidth();
  std::printf("copy bandwidth (read + write): %.3f TB/s\n", bw / 1e12);
  std::printf("%6s %6s %5s %5s %10s %10s %7s\n", "K", "N", "M", "group", "us/call", "roof_us", "roof%");

  const int shapes[][2] = {{4096, 4096}, {4096, 12288}, {8192, 8192}, {8192, 28672}, {28672, 8192}};
  const int ms[] = {1, 16, 32, 64, 128};
  for (auto& sh : shapes) {
    const int k = sh[0], n = sh[1];
    for (int group : {128, k}) {
      const size_t w_bytes = static_cast<size_t>(k) * n / 2, s_bytes = static_cast<size_t>(k / group) * n * 2;
      const int copies = static_cast<int>(std::max<size_t>(2, (kRotateBytes + w_bytes - 1) / w_bytes));
      std::vector<void*> w(copies), s(copies);
      for (int c = 0; c < copies; ++c) {
        CHECK_CUDA(cudaMalloc(&w[c], w_bytes));
        CHECK_CUDA(cudaMalloc(&s[c], s_bytes));
        CHECK_CUDA(cudaMemset(w[c], 0x5a + c, w_bytes));  // any bits are valid codes
        CHECK_CUDA(cudaMemset(s[c], 0x1c, s_bytes));      // fp16 0x1c1c ~ 0.004
      }
      for (int m : ms) {
        void *x, *y;
        float* ws;
        int* locks;
        CHECK_CUDA(cudaMalloc(&x, static_cast<size_t>(m) * k * 2));
        CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(m) * n * 2));
        CHECK_CUDA(cudaMalloc(&ws, cuda::workspace_floats(m, k, n) * 4));
        CHECK_CUDA(cudaMalloc(&locks, cuda::lock_count(m, n) * 4));
        CHECK_CUDA(cudaMemset(x, 0x3c, static_cast<size_t>(m) * k * 2));
        // Zeroed once: the kernel leaves its locks zeroed.
        CHECK_CUDA(cudaMemset(locks, 0, cuda::lock_count(m, n) * 4));
        const float us_call = median_us_per_call(
            [&](int i, cudaStream_t st) {
              const int c = i % copies;
              cuda::MarlinProblem p{cuda::ActDtype::kFloat16, x, w[c], s[c], y, ws, locks, true, m, k, n, group};
              CHECK_CUDA(cuda::marlin_matmul(p, st));
            },
            4 * copies);
        const double bytes = double(w_bytes) + s_bytes + 2.0 * m * (k + n);
        const double roof_us = bytes / bw * 1e6;
        std::printf("%6d %6d %5d %5s %10.2f %10.2f %6.0f%%\n", k, n, m, group == k ? "ch" : "128",
                    us_call, roof_us, 100 * roof_us / us_call);
        cudaFree(x), cudaFree(y), cudaFree(ws), cudaFree(locks);
      }
      for (int c = 0; c < copies; ++c) cudaFree(w[c]), cudaFree(s[c]);
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) return bench();
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  // --chains: only the back-to-back chains of the full run.
  const bool chains_only = argc > 1 && std::strcmp(argv[1], "--chains") == 0;
  std::mt19937 rng(1234);
  std::vector<Case> cases;
  const int ms_full[] = {1, 5, 16, 17, 33, 64, 65, 100, 128, 130, 200};
  const int ms_quick[] = {1, 33, 70, 100};
  // 5120 x 1024: more tiles than SMs on few n-tiles, so each n-tile is cut
  // into parts of unequal k-tile counts (stripe_count in launch_util.h).
  const int shapes_full[][2] = {{64, 64},    {128, 192},  {256, 256}, {384, 320},
                                {1024, 768}, {4096, 512}, {5120, 1024}};
  const int shapes_quick[][2] = {{256, 192}, {512, 512}};
  // The smallest layer with enough 256 x 256 tiles for the large tile of
  // M <= 16 (see kTileConfigs in marlin_dispatch.cu).
  const int long_k[2] = {4096, 8192};
  for (bool bf16 : {false, true}) {
    if (chains_only) break;
    if (quick) {
      for (auto& s : shapes_quick)
        for (int m : ms_quick)
          for (int g : {64, s[0]}) cases.push_back({m, s[0], s[1], g, bf16});
      cases.push_back({1, long_k[0], long_k[1], 128, bf16});
      // Stripes longer than the pipeline at 32-128 rows: every stage is
      // refilled, so the sanitizers see the producer warp's stage reuse
      // (M = 20: the 32-row tiles, group scales on their accumulators).
      for (int m : {20, 33, 64, 100}) cases.push_back({m, long_k[0], long_k[1], 128, bf16});
    } else {
      for (auto& s : shapes_full)
        for (int m : ms_full)
          for (int g : {32, 64, 128, s[0]})
            if (s[0] % g == 0) cases.push_back({m, s[0], s[1], g, bf16});
      for (int m : {1, 5, 8, 13, 16})
        for (int g : {32, 128, long_k[0]}) cases.push_back({m, long_k[0], long_k[1], g, bf16});
    }
  }
  int failures = 0;
  double worst[2] = {0, 0};
  for (const Case& c : cases) {
    const double err = run_case(c, rng, quick ? 1 : 3);
    const double tol = c.bf16 ? 1e-2 : 2e-3;
    worst[c.bf16] = std::fmax(worst[c.bf16], err);
    if (!(err <= tol)) {
      ++failures;
      std::printf("FAIL m=%d k=%d n=%d g=%d %s rel_err=%.3g\n", c.m, c.k, c.n, c.group,
                  c.bf16 ? "bf16" : "fp16", err);
    }
  }
  // Back-to-back chains: the 8- and 16-row tiles (overlapped launches:
  // kLaunchesOverlapping), and the 64- and 128-row ones.
  const int chain_ms_full[] = {1, 16, 64, 128}, chain_ms_quick[] = {1, 64};
  int chains = 0;
  for (int m : quick ? std::vector<int>(std::begin(chain_ms_quick), std::end(chain_ms_quick))
                     : std::vector<int>(std::begin(chain_ms_full), std::end(chain_ms_full))) {
    ++chains;
    if (!chain_matches(rng, m, quick ? 1024 : 4096)) ++failures;
  }
  std::printf("selftest: %zu cases + %d chains, %d failures; max rel err fp16 %.3g, bf16 %.3g\n",
              cases.size(), chains, failures, worst[0], worst[1]);
  return failures ? 1 : 0;
}
