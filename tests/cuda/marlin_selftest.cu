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
#include "host_weight.h"

using namespace jax_marlin;

struct Case {
  int m, k, n, group;  // group == k: per-channel
  bool bf16;
};

// Returns relative error ||y - ref|| / ||ref||, or a large value on failure:
// 1e9 NaN/inf, 2e9 repeats not bit-identical, 3e9 locks not left at zero.
static double run_case(const Case& c, std::mt19937& rng, int repeats) {
  const bool bf16 = c.bf16;
  const HostWeight wt = make_host_weight(rng, c.k, c.n, c.group, bf16);
  const std::vector<uint16_t> x = random_activations(rng, c.m, c.k, bf16);
  const std::vector<double> ref = host_reference(x, wt, c.m);
  const std::vector<uint32_t>& packed = wt.packed;
  const std::vector<uint16_t>& scales_perm = wt.scales_perm;

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
    const double err = relative_error(y, ref, bf16);
    if (err >= 1e9) return err;
    worst = std::fmax(worst, err);
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
  const double bw = copy_bandwidth();
  std::printf("copy bandwidth (read + write): %.3f TB/s\n", bw / 1e12);
  std::printf("%6s %6s %5s %5s %10s %10s %7s\n", "K", "N", "M", "group", "us/call", "roof_us", "roof%");

  const int shapes[][2] = {{4096, 4096}, {4096, 12288}, {8192, 8192}, {8192, 28672}, {28672, 8192}};
  const int ms[] = {1, 16, 32, 64, 128};
  for (auto& sh : shapes) {
    const int k = sh[0], n = sh[1];
    for (int group : {128, k}) {
      const RotatedWeights rw(k, n, group);
      const int copies = rw.copies;
      const std::vector<void*>&w = rw.w, &s = rw.s;
      for (int m : ms) {
        const CallBuffers b(m, k, n);
        const float us_call = median_us_per_call(
            [&](int i, cudaStream_t st) {
              const int c = i % copies;
              cuda::MarlinProblem p{cuda::ActDtype::kFloat16, b.x, w[c], s[c], b.y, b.ws, b.locks, true,
                                    m, k, n, group};
              CHECK_CUDA(cuda::marlin_matmul(p, st));
            },
            4 * copies);
        const double bytes = double(rw.w_bytes) + rw.s_bytes + 2.0 * m * (k + n);
        const double roof_us = bytes / bw * 1e6;
        std::printf("%6d %6d %5d %5s %10.2f %10.2f %6.0f%%\n", k, n, m, group == k ? "ch" : "128",
                    us_call, roof_us, 100 * roof_us / us_call);
      }
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
