// Standalone check of the prefill kernel (prefill_launch.h), independent of
// JAX: packs random codes with the host-side layout tables, runs every tile
// variant and compares with an fp64 host reference.
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -DJAX_MARLIN_SM90A_BUILD \
//        -Icsrc -Itests/cuda tests/cuda/prefill_selftest.cu csrc/cuda/prefill_dispatch.cu \
//        csrc/cuda/marlin_dispatch.cu -o prefill_selftest && ./prefill_selftest
//
// Every variant runs with each K split it takes (1 to 4 blocks a tile), on
// dense and on 2:4 weights (its 2:4 form, all variants but the 2x2 tile);
// the split runs' workspace is poisoned first, their tile counters must be
// zero again afterwards, and a second run must give the same bits.
//
// `--bench`: times every variant and K split (those whose blocks fit one
// wave) against marlin_matmul at M = 64-2048 on the Llama layers, weights
// rotated through 4x the L2, in TFLOP/s, and names pick_prefill_shape's
// choice ("pick" lines); run it with JAX_MARLIN_PREFILL=0 for marlin_matmul
// to be the Marlin kernel's 128-row chunks. `--quick`: a small subset, for
// compute-sanitizer.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/marlin_launch.h"
#include "cuda/prefill_launch.h"
#include "cuda_test_util.h"
#include "host_weight.h"
#include "sparse_host_weight.h"

using namespace jax_marlin;

// One case's operands on the device: x, the weight (dense: packed, meta
// null; 2:4: the kept values and their metadata), scales, y; and the fp64
// reference of x times the weight.
struct Case {
  int m, k, n, group;
  bool bf16;
  void *x, *packed, *meta, *scales, *y;
  std::vector<double> ref;
};

template <typename V>
static void* to_device(const std::vector<V>& v) {
  void* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, v.size() * sizeof(V)));
  CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice));
  return d;
}

// Relative error of every variant that serves the case (the 2:4 form where
// c.meta is set), with each K split it takes, against the case's reference;
// failures printed. Returns the number of failures.
static int run_variants(const Case& c, double (&worst)[2], int& runs) {
  const int m = c.m, k = c.k, n = c.n;
  int failures = 0;
  const double tol = c.bf16 ? 1e-2 : 2e-3;
  for (int v = 0; v < cuda::kPrefillVariants; ++v)
    for (int splits = 1; splits <= cuda::kPrefillMaxSplits; ++splits) {
      cuda::PrefillProblem p{c.bf16 ? cuda::ActDtype::kBFloat16 : cuda::ActDtype::kFloat16,
                             c.x, c.packed, c.scales, c.y, m, k, n, c.group, v, splits};
      p.meta = c.meta;
      if (cuda::prefill_unsupported_reason(p) != nullptr) continue;
      float* parts = nullptr;
      int* counters = nullptr;
      const int tiles = cuda::prefill_tiles(p);
      if (splits > 1) {
        const size_t floats = cuda::prefill_partial_floats(p);
        CHECK_CUDA(cudaMalloc(&parts, floats * 4));
        CHECK_CUDA(cudaMemset(parts, 0xff, floats * 4));  // NaN: every part read must have been written
        CHECK_CUDA(cudaMalloc(&counters, tiles * sizeof(int)));
        CHECK_CUDA(cudaMemset(counters, 0, tiles * sizeof(int)));
      }
      p.partials = parts, p.counters = counters;
      ++runs;
      // A split runs twice: the sum in split order must give the same bits
      // whichever split finishes last.
      std::vector<uint16_t> y(static_cast<size_t>(m) * n), again;
      for (int rep = 0; rep < (splits > 1 ? 2 : 1); ++rep) {
        again = y;
        CHECK_CUDA(cudaMemset(c.y, 0xff, static_cast<size_t>(m) * n * 2));  // poison: every element must be written
        CHECK_CUDA(cuda::prefill_matmul(p, nullptr));
        CHECK_CUDA(cudaDeviceSynchronize());
        CHECK_CUDA(cudaMemcpy(y.data(), c.y, y.size() * 2, cudaMemcpyDeviceToHost));
      }
      const bool repeatable = splits == 1 || again == y;
      const double err = relative_error(y, c.ref, c.bf16);
      worst[c.bf16] = std::fmax(worst[c.bf16], err);
      int counts_left = 0;
      if (splits > 1) {
        std::vector<int> after(tiles);
        CHECK_CUDA(cudaMemcpy(after.data(), counters, tiles * sizeof(int), cudaMemcpyDeviceToHost));
        for (int count : after) counts_left += count != 0;
        cudaFree(parts), cudaFree(counters);
      }
      if (!(err <= tol) || counts_left != 0 || !repeatable) {
        ++failures;
        std::printf("FAIL %s variant %d splits %d m=%d k=%d n=%d g=%d %s rel_err=%.3g, %d tile counters not reset%s\n",
                    c.meta ? "2:4" : "dense", v, splits, m, k, n, c.group, c.bf16 ? "bf16" : "fp16", err,
                    counts_left, repeatable ? "" : ", a rerun's bits differ");
      }
    }
  cudaFree(c.x), cudaFree(c.packed), cudaFree(c.meta), cudaFree(c.scales), cudaFree(c.y);
  return failures;
}

static int check_case(int m, int k, int n, int group, bool bf16, std::mt19937& rng, double (&worst)[2],
                      int& runs) {
  const HostWeight wt = make_host_weight(rng, k, n, group, bf16);
  const std::vector<uint16_t> x = random_activations(rng, m, k, bf16);
  void* y = nullptr;
  CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(m) * n * 2));
  return run_variants({m, k, n, group, bf16, to_device(x), to_device(wt.packed), nullptr, to_device(wt.scales_perm),
                       y, host_reference(x, wt, m)},
                      worst, runs);
}

// The same with a random 2:4 weight (sparse_host_weight.h).
static int check_sparse_case(int m, int k, int n, int group, bool bf16, sparse_host::Rng& rng, double (&worst)[2],
                             int& runs) {
  const sparse_host::SparseWeight wt = sparse_host::make_weight(k, n, rng);
  std::vector<uint16_t> scales(static_cast<size_t>(k / group) * n), x(static_cast<size_t>(m) * k);
  for (auto& v : scales) v = to_bits(rng.uniform(0.002f, 0.02f), bf16);
  for (auto& v : x) v = to_bits(rng.uniform(-1.f, 1.f), bf16);
  void* y = nullptr;
  CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(m) * n * 2));
  return run_variants({m, k, n, group, bf16, to_device(x), to_device(wt.values), to_device(wt.meta),
                       to_device(sparse_host::permute_scales(scales)), y,
                       sparse_host::reference(wt, scales, group, x, m, bf16)},
                      worst, runs);
}

static int bench() {
  std::printf("%6s %6s %5s %5s %6s %10s %8s\n", "K", "N", "M", "group", "var", "us/call", "TFLOP/s");
  // Issue 4's layer sets (the dispatch tables' shapes).
  const int shapes[][2] = {{4096, 12288}, {4096, 4096},  {4096, 22016}, {11008, 4096},
                           {8192, 10240}, {8192, 8192}, {8192, 57344}, {28672, 8192}};
  for (auto& sh : shapes) {
    const int k = sh[0], n = sh[1];
    for (int group : {128, k}) {
      const RotatedWeights rw(k, n, group);
      const int copies = rw.copies;
      const std::vector<void*>&w = rw.w, &s = rw.s;
      for (int m : {64, 128, 256, 512, 1024, 2048}) {
        const CallBuffers b(m, k, n);
        const double flop = 2.0 * m * k * n;
        auto report = [&](const std::string& var, float us) {
          std::printf("%6d %6d %5d %5s %6s %10.2f %8.1f\n", k, n, m, group == k ? "ch" : "128", var.c_str(), us,
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
        // Names: p (128-row tiles) or q (64-row), warpgroups x slabs, and
        // the K split after an s.
        const char* names[] = {"p41", "p22", "p21", "q41", "q21"};
        for (int v = 0; v < cuda::kPrefillVariants; ++v)
          for (int splits = 1; splits <= cuda::kPrefillMaxSplits; ++splits) {
            cuda::PrefillProblem p{cuda::ActDtype::kFloat16, b.x, w[0], s[0], b.y, m, k, n, group, v, splits,
                                   b.ws, b.locks};
            if (cuda::prefill_unsupported_reason(p) != nullptr) continue;
            // A split's blocks fit one wave (what the workspace is sized for).
            if (splits > 1 && cuda::prefill_partial_floats(p) > cuda::prefill_partial_floats_bound()) break;
            report(std::string(names[v]) + (splits > 1 ? "s" + std::to_string(splits) : ""),
                   median_us_per_call(
                       [&](int i, cudaStream_t st) {
                         cuda::PrefillProblem q = p;
                         q.packed = w[i % copies], q.scales = s[i % copies];
                         CHECK_CUDA(cuda::prefill_matmul(q, st));
                       },
                       2 * copies, 5));
          }
        const cuda::PrefillShape pick =
            cuda::pick_prefill_shape(cuda::PrefillProblem{cuda::ActDtype::kFloat16, b.x, w[0], s[0], b.y, m, k, n, group});
        std::printf("pick %d %d %d %s %s\n", k, n, m, group == k ? "ch" : "128",
                    pick.variant < 0 ? "mar"
                                     : (std::string(names[pick.variant]) +
                                        (pick.splits > 1 ? "s" + std::to_string(pick.splits) : ""))
                                           .c_str());
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
  const int ms_full[] = {1, 64, 100, 128, 130, 300}, ms_quick[] = {130};
  // K = 1024 and 2048: 16 and 32 stages of 64, more than the ring holds.
  const int shapes_full[][2] = {{256, 256}, {1024, 768}, {2048, 512}}, shapes_quick[][2] = {{1024, 512}};
  int failures = 0, cases = 0, runs = 0;
  double worst[2] = {0, 0};
  sparse_host::Rng sparse_rng{8765};
  for (bool bf16 : {false, true})
    for (int si = 0; si < (quick ? 1 : 3); ++si) {
      const int k = quick ? shapes_quick[si][0] : shapes_full[si][0];
      const int n = quick ? shapes_quick[si][1] : shapes_full[si][1];
      for (int m : quick ? std::vector<int>(std::begin(ms_quick), std::end(ms_quick))
                         : std::vector<int>(std::begin(ms_full), std::end(ms_full)))
        for (int g : {32, 64, 128, k}) {
          if (k % g != 0) continue;
          cases += 2;
          failures += check_case(m, k, n, g, bf16, rng, worst, runs);
          failures += check_sparse_case(m, k, n, g, bf16, sparse_rng, worst, runs);
        }
    }
  std::printf("prefill selftest: %d cases, %d kernel runs, %d failures; max rel err fp16 %.3g, bf16 %.3g\n", cases,
              runs, failures, worst[0], worst[1]);
  return failures || runs == 0 ? 1 : 0;
}
