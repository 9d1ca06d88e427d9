// Standalone check of the prefill kernel (prefill_launch.h), independent of
// JAX: packs random codes with the host-side layout tables, runs every tile
// variant and compares with an fp64 host reference.
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -DJAX_MARLIN_SM90A_BUILD \
//        -Icsrc -Itests/cuda tests/cuda/prefill_selftest.cu csrc/cuda/prefill_dispatch.cu \
//        csrc/cuda/marlin_dispatch.cu -o prefill_selftest && ./prefill_selftest
//
// `--bench`: times every variant against marlin_matmul at M = 128-2048 on
// the Llama layers, weights rotated through 4x the L2, in TFLOP/s; run it
// with JAX_MARLIN_PREFILL=0 for marlin_matmul to be the Marlin kernel's
// 128-row chunks. `--quick`: a small subset, for compute-sanitizer.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/marlin_launch.h"
#include "cuda/prefill_launch.h"
#include "cuda_test_util.h"
#include "host_weight.h"

using namespace jax_marlin;

// Relative error of every variant that serves the case, against one host
// reference; failures printed. Returns the number of failures.
static int check_case(int m, int k, int n, int group, bool bf16, std::mt19937& rng, double (&worst)[2],
                      int& runs) {
  const HostWeight wt = make_host_weight(rng, k, n, group, bf16);
  const std::vector<uint16_t> x = random_activations(rng, m, k, bf16);
  const std::vector<double> ref = host_reference(x, wt, m);
  void *dx, *dp, *ds, *dy;
  CHECK_CUDA(cudaMalloc(&dx, x.size() * 2));
  CHECK_CUDA(cudaMalloc(&dp, wt.packed.size() * 4));
  CHECK_CUDA(cudaMalloc(&ds, wt.scales_perm.size() * 2));
  CHECK_CUDA(cudaMalloc(&dy, static_cast<size_t>(m) * n * 2));
  CHECK_CUDA(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dp, wt.packed.data(), wt.packed.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(ds, wt.scales_perm.data(), wt.scales_perm.size() * 2, cudaMemcpyHostToDevice));
  int failures = 0;
  const double tol = bf16 ? 1e-2 : 2e-3;
  for (int v = 0; v < cuda::kPrefillVariants; ++v) {
    cuda::PrefillProblem p{bf16 ? cuda::ActDtype::kBFloat16 : cuda::ActDtype::kFloat16, dx, dp, ds, dy, m, k, n,
                           group, v};
    if (cuda::prefill_unsupported_reason(p) != nullptr) continue;
    ++runs;
    CHECK_CUDA(cudaMemset(dy, 0xff, static_cast<size_t>(m) * n * 2));  // poison: every element must be written
    CHECK_CUDA(cuda::prefill_matmul(p, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<uint16_t> y(static_cast<size_t>(m) * n);
    CHECK_CUDA(cudaMemcpy(y.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost));
    const double err = relative_error(y, ref, bf16);
    worst[bf16] = std::fmax(worst[bf16], err);
    if (!(err <= tol)) {
      ++failures;
      std::printf("FAIL variant %d m=%d k=%d n=%d g=%d %s rel_err=%.3g\n", v, m, k, n, group, bf16 ? "bf16" : "fp16",
                  err);
    }
  }
  cudaFree(dx), cudaFree(dp), cudaFree(ds), cudaFree(dy);
  return failures;
}

static int bench() {
  std::printf("%6s %6s %5s %5s %4s %10s %8s\n", "K", "N", "M", "group", "var", "us/call", "TFLOP/s");
  // Issue 4's layer sets (the dispatch tables' shapes).
  const int shapes[][2] = {{4096, 12288}, {4096, 4096},  {4096, 22016}, {11008, 4096},
                           {8192, 10240}, {8192, 8192}, {8192, 57344}, {28672, 8192}};
  for (auto& sh : shapes) {
    const int k = sh[0], n = sh[1];
    for (int group : {128, k}) {
      const RotatedWeights rw(k, n, group);
      const int copies = rw.copies;
      const std::vector<void*>&w = rw.w, &s = rw.s;
      for (int m : {128, 256, 512, 1024, 2048}) {
        const CallBuffers b(m, k, n);
        const double flop = 2.0 * m * k * n;
        auto report = [&](const char* var, float us) {
          std::printf("%6d %6d %5d %5s %4s %10.2f %8.1f\n", k, n, m, group == k ? "ch" : "128", var, us,
                      flop / us * 1e-6);
        };
        report("mar", median_us_per_call(
                          [&](int i, cudaStream_t st) {
                            const int c = i % copies;
                            cuda::MarlinProblem p{cuda::ActDtype::kFloat16, b.x, w[c], s[c], b.y, b.ws, b.locks,
                                                  true, m, k, n, group};
                            CHECK_CUDA(cuda::marlin_matmul(p, st));
                          },
                          2 * copies, 5));
        for (int v = 0; v < cuda::kPrefillVariants; ++v) {
          cuda::PrefillProblem p{cuda::ActDtype::kFloat16, b.x, w[0], s[0], b.y, m, k, n, group, v};
          if (cuda::prefill_unsupported_reason(p) != nullptr) continue;
          const char* names[] = {"p41", "p22", "p21"};
          report(names[v], median_us_per_call(
                               [&](int i, cudaStream_t st) {
                                 cuda::PrefillProblem q = p;
                                 q.packed = w[i % copies], q.scales = s[i % copies];
                                 CHECK_CUDA(cuda::prefill_matmul(q, st));
                               },
                               2 * copies, 5));
        }
      }
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines reach a log before a timeout kills a hung run
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) return bench();
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  std::mt19937 rng(4321);
  const int ms_full[] = {1, 100, 128, 130, 300}, ms_quick[] = {130};
  // K = 1024 and 2048: 16 and 32 stages of 64, more than the ring holds.
  const int shapes_full[][2] = {{256, 256}, {1024, 768}, {2048, 512}}, shapes_quick[][2] = {{1024, 512}};
  int failures = 0, cases = 0, runs = 0;
  double worst[2] = {0, 0};
  for (bool bf16 : {false, true})
    for (int si = 0; si < (quick ? 1 : 3); ++si) {
      const int k = quick ? shapes_quick[si][0] : shapes_full[si][0];
      const int n = quick ? shapes_quick[si][1] : shapes_full[si][1];
      for (int m : quick ? std::vector<int>(std::begin(ms_quick), std::end(ms_quick))
                         : std::vector<int>(std::begin(ms_full), std::end(ms_full)))
        for (int g : {32, 64, 128, k}) {
          if (k % g != 0) continue;
          ++cases;
          failures += check_case(m, k, n, g, bf16, rng, worst, runs);
        }
    }
  std::printf("prefill selftest: %d cases, %d kernel runs, %d failures; max rel err fp16 %.3g, bf16 %.3g\n", cases,
              runs, failures, worst[0], worst[1]);
  return failures || runs == 0 ? 1 : 0;
}
