// Standalone check of the 2:4 sparse CUDA launcher (issue 8), independent of
// JAX: random 2:4 codes packed on the host with the layout tables of
// csrc/common/sparse_layout.h, sparse_matmul against an fp64 host reference
// of the pruned, dequantized weight.
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icsrc tests/cuda/sparse_selftest.cu \
//        csrc/cuda/sparse_dispatch.cu csrc/cuda/marlin_dispatch.cu -o sparse_selftest
//   ./sparse_selftest            every shape (Llama ones too), M, group size, dtype;
//                                3 repeats each, bit-identical
//   ./sparse_selftest --quick    a small subset, for compute-sanitizer
//   ./sparse_selftest --chains   only the back-to-back chains (cuda_test_util.h)
//   ./sparse_selftest --bench    us/call (CUDA graphs) vs the dense kernel on the
//                                same shape, and the copy-bandwidth roofline
//
// On a failure it prints the error per n-block of a run (nb = column % 64 / 16):
// nb 1 and 3 wrong with 0 and 2 right means the mma.sp sparsity selector 1
// (metadata from lanes t = 2, 3) does not read what docs/SPARSE_FORMAT.md says.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/float16.h"
#include "common/marlin_layout.h"
#include "common/sparse_layout.h"
#include "cuda/marlin_launch.h"
#include "cuda/sparse_launch.h"
#include "cuda_test_util.h"
#include "sparse_host_weight.h"

using namespace jax_marlin;

namespace {

using sparse_host::make_weight;
using sparse_host::permute_scales;
using sparse_host::reference;
using sparse_host::Rng;
using sparse_host::SparseWeight;

struct Setup {
  int k, n, group;  // group == k: per-channel
  bool bf16;
};

// Checks sparse_matmul for every M in `ms` (rows 0 .. M-1 of one x) on one
// weight. Returns the number of failing M; `worst` gets the largest error.
// Failure codes in the report: NaN/inf, repeats not bit-identical, locks not
// left at zero, relative error over the tolerance.
int run_setup(const Setup& st, const std::vector<int>& ms, int repeats, Rng& rng, double* worst) {
  const bool bf16 = st.bf16;
  const int k = st.k, n = st.n, groups = k / st.group;
  const int m_max = *std::max_element(ms.begin(), ms.end());
  const SparseWeight w = make_weight(k, n, rng);
  std::vector<uint16_t> scales(static_cast<size_t>(groups) * n);
  for (auto& v : scales) v = to_bits(rng.uniform(0.002f, 0.02f), bf16);
  const std::vector<uint16_t> scales_perm = permute_scales(scales);
  std::vector<uint16_t> x(static_cast<size_t>(m_max) * k);
  for (auto& v : x) v = to_bits(rng.uniform(-1.f, 1.f), bf16);
  const std::vector<double> ref = reference(w, scales, st.group, x, m_max, bf16);

  void *dx, *dv, *dm, *ds, *dy;
  float* dws;
  int* dlocks;
  size_t ws_floats = 0, lock_ints = 0;
  for (int m : ms) {
    ws_floats = std::max(ws_floats, cuda::sparse_workspace_floats(m, k, n));
    lock_ints = std::max(lock_ints, cuda::lock_count(m, n));
  }
  CHECK_CUDA(cudaMalloc(&dx, x.size() * 2));
  CHECK_CUDA(cudaMalloc(&dv, w.values.size() * 4));
  CHECK_CUDA(cudaMalloc(&dm, w.meta.size() * 4));
  CHECK_CUDA(cudaMalloc(&ds, scales_perm.size() * 2));
  CHECK_CUDA(cudaMalloc(&dy, static_cast<size_t>(m_max) * n * 2));
  CHECK_CUDA(cudaMalloc(&dws, std::max<size_t>(ws_floats, 1) * 4));
  CHECK_CUDA(cudaMalloc(&dlocks, lock_ints * 4));
  CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dv, w.values.data(), w.values.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dm, w.meta.data(), w.meta.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(ds, scales_perm.data(), scales_perm.size() * 2, cudaMemcpyHostToDevice));

  const double tol = bf16 ? 1e-2 : 2e-3;
  int failures = 0;
  for (int m : ms) {
    // Poison output, workspace and locks: the launcher must not rely on zeros.
    CHECK_CUDA(cudaMemset(dy, 0xff, static_cast<size_t>(m_max) * n * 2));
    CHECK_CUDA(cudaMemset(dws, 0x7f, std::max<size_t>(ws_floats, 1) * 4));
    CHECK_CUDA(cudaMemset(dlocks, 0x55, lock_ints * 4));
    cuda::SparseProblem p{bf16 ? cuda::ActDtype::kBFloat16 : cuda::ActDtype::kFloat16,
                          dx, dv, dm, ds, dy, dws, dlocks, false, m, k, n, st.group};
    std::vector<uint16_t> y(static_cast<size_t>(m) * n), first;
    const char* why = nullptr;
    double err = 0;
    for (int rep = 0; rep < repeats && !why; ++rep) {
      CHECK_CUDA(cuda::sparse_matmul(p, nullptr));
      p.locks_zeroed = true;  // the kernel leaves them zeroed
      CHECK_CUDA(cudaDeviceSynchronize());
      CHECK_CUDA(cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost));
      double num = 0, den = 0;
      double nb_num[4] = {0, 0, 0, 0}, nb_den[4] = {0, 0, 0, 0};
      for (size_t i = 0; i < y.size(); ++i) {
        const double v = from_bits(y[i], bf16), d = (v - ref[i]) * (v - ref[i]);
        if (!std::isfinite(v)) {
          why = "NaN/inf in y";
          break;
        }
        num += d;
        den += ref[i] * ref[i];
        const int nb = static_cast<int>(i % n) % 64 / 16;
        nb_num[nb] += d;
        nb_den[nb] += ref[i] * ref[i];
      }
      if (why) break;
      err = std::fmax(err, std::sqrt(num / den));
      if (!(err <= tol)) {
        why = "error over tolerance";
        std::printf("  rel err by n-block of a run (nb = col %% 64 / 16): %.3g %.3g %.3g %.3g\n",
                    std::sqrt(nb_num[0] / nb_den[0]), std::sqrt(nb_num[1] / nb_den[1]),
                    std::sqrt(nb_num[2] / nb_den[2]), std::sqrt(nb_num[3] / nb_den[3]));
      }
      if (rep == 0) first = y;
      else if (std::memcmp(first.data(), y.data(), y.size() * 2) != 0) why = "repeats not bit-identical";
    }
    if (!why) {
      std::vector<int> locks_after(cuda::lock_count(m, n));
      CHECK_CUDA(cudaMemcpy(locks_after.data(), dlocks, locks_after.size() * 4, cudaMemcpyDeviceToHost));
      for (int v : locks_after)
        if (v != 0) why = "locks not left at zero";
    }
    *worst = std::fmax(*worst, err);
    if (why) {
      ++failures;
      std::printf("FAIL m=%d k=%d n=%d g=%s %s: %s (rel err %.3g)\n", m, k, n,
                  st.group == k ? "ch" : std::to_string(st.group).c_str(), bf16 ? "bf16" : "fp16", why, err);
    }
  }
  cudaFree(dx), cudaFree(dv), cudaFree(dm), cudaFree(ds), cudaFree(dy), cudaFree(dws), cudaFree(dlocks);
  return failures;
}

// --- kernel-only timing -----------------------------------------------------

int bench() {
  constexpr size_t kRotateBytes = size_t{200} << 20;  // 4x the 50 MB L2
  const double bw = copy_bandwidth();
  std::printf("copy bandwidth (read + write): %.3f TB/s\n", bw / 1e12);
  std::printf("%6s %6s %5s %5s %10s %10s %7s %10s %7s\n", "K", "N", "M", "group", "sparse_us",
              "dense_us", "dense/sp", "roof_us", "roof%");
  const int shapes[][2] = {{4096, 4096}, {4096, 12288}, {11008, 4096}, {8192, 28672}, {28672, 8192}};
  const int ms[] = {1, 16, 32, 64, 128, 256};
  for (auto& sh : shapes) {
    const int k = sh[0], n = sh[1];
    for (int group : {128, k}) {
      const size_t v_bytes = static_cast<size_t>(k) * n / 4, m_bytes = static_cast<size_t>(k) * n / 8;
      const size_t d_bytes = static_cast<size_t>(k) * n / 2, s_bytes = static_cast<size_t>(k / group) * n * 2;
      const int copies = static_cast<int>(std::max<size_t>(2, (kRotateBytes + d_bytes - 1) / d_bytes));
      std::vector<void*> v(copies), mt(copies), d(copies), s(copies);
      // Valid metadata everywhere: positions (0, 1) in every chunk = 0x4 a
      // nibble. Any value bits are valid codes.
      for (int c = 0; c < copies; ++c) {
        CHECK_CUDA(cudaMalloc(&v[c], v_bytes));
        CHECK_CUDA(cudaMalloc(&mt[c], m_bytes));
        CHECK_CUDA(cudaMalloc(&d[c], d_bytes));
        CHECK_CUDA(cudaMalloc(&s[c], s_bytes));
        CHECK_CUDA(cudaMemset(v[c], 0x5a + c, v_bytes));
        CHECK_CUDA(cudaMemset(mt[c], 0x44, m_bytes));
        CHECK_CUDA(cudaMemset(d[c], 0x5a + c, d_bytes));
        CHECK_CUDA(cudaMemset(s[c], 0x1c, s_bytes));  // fp16 0x1c1c ~ 0.004
      }
      for (int m : ms) {
        void *x, *y;
        float* ws;
        int* locks;
        const size_t ws_floats = std::max(cuda::sparse_workspace_floats(m, k, n), cuda::workspace_floats(m, k, n));
        CHECK_CUDA(cudaMalloc(&x, static_cast<size_t>(m) * k * 2));
        CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(m) * n * 2));
        CHECK_CUDA(cudaMalloc(&ws, ws_floats * 4));
        CHECK_CUDA(cudaMalloc(&locks, cuda::lock_count(m, n) * 4));
        CHECK_CUDA(cudaMemset(x, 0x3c, static_cast<size_t>(m) * k * 2));
        CHECK_CUDA(cudaMemset(locks, 0, cuda::lock_count(m, n) * 4));
        const float sparse_us = median_us_per_call(
            [&](int i, cudaStream_t stream) {
              const int c = i % copies;
              cuda::SparseProblem p{cuda::ActDtype::kFloat16, x, v[c], mt[c], s[c], y, ws, locks, true, m, k, n, group};
              CHECK_CUDA(cuda::sparse_matmul(p, stream));
            },
            4 * copies);
        const float dense_us = median_us_per_call(
            [&](int i, cudaStream_t stream) {
              const int c = i % copies;
              cuda::MarlinProblem p{cuda::ActDtype::kFloat16, x, d[c], s[c], y, ws, locks, true, m, k, n, group};
              CHECK_CUDA(cuda::marlin_matmul(p, stream));
            },
            4 * copies);
        const double bytes = double(v_bytes) + m_bytes + s_bytes + 2.0 * m * (k + n);
        const double roof_us = bytes / bw * 1e6;
        std::printf("%6d %6d %5d %5s %10.2f %10.2f %7.2f %10.2f %6.0f%%\n", k, n, m,
                    group == k ? "ch" : "128", sparse_us, dense_us, dense_us / sparse_us, roof_us,
                    100 * roof_us / sparse_us);
        cudaFree(x), cudaFree(y), cudaFree(ws), cudaFree(locks);
      }
      for (int c = 0; c < copies; ++c) cudaFree(v[c]), cudaFree(mt[c]), cudaFree(d[c]), cudaFree(s[c]);
    }
  }
  return 0;
}

}  // namespace

// A back-to-back chain (chain_failure in cuda_test_util.h) of an M x K
// activation through a K x K 2:4 group-128 weight, fp16: fails if a call
// reads x, the workspace or the locks, or writes anything, before its
// predecessor is done (the launcher overlaps calls of up to 16 rows).
bool chain_matches(Rng& rng, int m, int k) {
  constexpr int kGroup = 128;
  const SparseWeight w = make_weight(k, k, rng);
  // Half the codes kept, -8..7 (std ~4.6), times scales of random sign and
  // size ~1 / (3.25 sqrt(K)): a weight of mean 0 that keeps the chain's
  // outputs O(1).
  std::vector<uint16_t> scales(static_cast<size_t>(k / kGroup) * k);
  for (auto& v : scales)
    v = to_bits((rng.next() & 1 ? -1.f : 1.f) * rng.uniform(0.5f, 1.5f) / (3.25f * std::sqrt(float(k))), false);
  const std::vector<uint16_t> scales_perm = permute_scales(scales);
  std::vector<uint16_t> x(static_cast<size_t>(m) * k);
  for (auto& v : x) v = to_bits(rng.uniform(-1.7f, 1.7f), false);

  void *dv, *dm, *ds;
  float* ws;
  int* locks;
  const size_t ws_floats = std::max<size_t>(cuda::sparse_workspace_floats(m, k, k), 1);
  CHECK_CUDA(cudaMalloc(&dv, w.values.size() * 4));
  CHECK_CUDA(cudaMalloc(&dm, w.meta.size() * 4));
  CHECK_CUDA(cudaMalloc(&ds, scales_perm.size() * 2));
  CHECK_CUDA(cudaMalloc(&ws, ws_floats * 4));
  CHECK_CUDA(cudaMalloc(&locks, cuda::lock_count(m, k) * 4));
  CHECK_CUDA(cudaMemcpy(dv, w.values.data(), w.values.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dm, w.meta.data(), w.meta.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(ds, scales_perm.data(), scales_perm.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(locks, 0, cuda::lock_count(m, k) * 4));
  const char* failure = chain_failure(x, [&](void* in, void* out, cudaStream_t stream) {
    cuda::SparseProblem p{cuda::ActDtype::kFloat16, in, dv, dm, ds, out, ws, locks, true, m, k, k, kGroup};
    CHECK_CUDA(cuda::sparse_matmul(p, stream));
  });
  cudaFree(dv), cudaFree(dm), cudaFree(ds), cudaFree(ws), cudaFree(locks);
  if (failure) std::printf("FAIL chain m=%d k=n=%d: %s\n", m, k, failure);
  return failure == nullptr;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) return bench();
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  // --chains: only the back-to-back chains of the full run.
  const bool chains_only = argc > 1 && std::strcmp(argv[1], "--chains") == 0;
  Rng rng{1234};
  std::vector<Setup> setups;
  std::vector<int> ms;
  if (quick) {
    ms = {1, 33, 70, 100};
    const int shapes[][2] = {{256, 192}, {512, 512}, {1024, 256}};
    for (bool bf16 : {false, true})
      for (auto& s : shapes)
        for (int g : {64, s[0]}) setups.push_back({s[0], s[1], g, bf16});
    // The smallest layer with enough 256 x 256 tiles for the large tile of
    // M <= 16 (see kSparseConfigs in sparse_dispatch.cu), for the sanitizers.
    setups.push_back({4096, 8192, 128, false});
  } else {
    ms = {1, 2, 7, 16, 33, 64, 100, 128, 200};
    // Small shapes reach every tile of the table (512 x 128, 128 x 256,
    // 256 x 128, 64 x 64) at every group size; 8192 x 2048 and the Llama
    // shapes have more tiles than SMs, so blocks share n-tiles.
    const int small[][2] = {{64, 64}, {128, 192}, {256, 256}, {384, 320}, {768, 384},
                            {1024, 768}, {4096, 512}, {8192, 2048}};
    for (bool bf16 : {false, true})
      for (auto& s : small)
        for (int g : {32, 64, 128, s[0]})
          if (s[0] % g == 0) setups.push_back({s[0], s[1], g, bf16});
    const int llama[][2] = {{4096, 4096}, {4096, 12288}, {11008, 4096}, {8192, 28672}};
    for (auto& s : llama) {
      for (int g : {32, 64, 128, s[0]}) setups.push_back({s[0], s[1], g, false});
      for (int g : {128, s[0]}) setups.push_back({s[0], s[1], g, true});
    }
  }
  if (chains_only) setups.clear();
  int failures = 0, cases = 0;
  double worst[2] = {0, 0};
  for (const Setup& st : setups) {
    failures += run_setup(st, ms, quick ? 1 : 3, rng, &worst[st.bf16]);
    cases += static_cast<int>(ms.size());
  }
  // Back-to-back chains: the 8- and 16-row tiles (overlapped launches), and
  // a 64-row one.
  const std::vector<int> chain_ms = quick ? std::vector<int>{1, 64} : std::vector<int>{1, 16, 64};
  for (int m : chain_ms)
    if (!chain_matches(rng, m, quick ? 1024 : 4096)) ++failures;
  std::printf("sparse selftest: %d cases + %zu chains, %d failures; max rel err fp16 %.3g, bf16 %.3g\n",
              cases, chain_ms.size(), failures, worst[0], worst[1]);
  return failures ? 1 : 0;
}
