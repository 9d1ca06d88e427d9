// Host-side quantized weights for the standalone self-tests: random codes
// and scales packed as FORMAT.md says (with the layout tables of
// common/marlin_layout.h), random activations, and the fp64 reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/float16.h"
#include "common/marlin_layout.h"

inline uint16_t to_bits(float v, bool bf16) { return bf16 ? jax_marlin::FloatToBf16(v) : jax_marlin::FloatToHalf(v); }
inline float from_bits(uint16_t b, bool bf16) { return bf16 ? jax_marlin::Bf16ToFloat(b) : jax_marlin::HalfToFloat(b); }

struct HostWeight {
  int k, n, group;  // group == k: per-channel
  bool bf16;
  std::vector<uint8_t> codes;         // (k, n), 0..15
  std::vector<uint16_t> scales;       // (k / group, n), unpermuted
  std::vector<uint32_t> packed;       // (k / 16, 2 n), Marlin layout
  std::vector<uint16_t> scales_perm;  // (k / group, n), permuted
};

inline HostWeight make_host_weight(std::mt19937& rng, int k, int n, int group, bool bf16) {
  using namespace jax_marlin;
  HostWeight w{k, n, group, bf16, {}, {}, {}, {}};
  const int groups = k / group;
  std::uniform_int_distribution<int> code_dist(0, 15);
  std::uniform_real_distribution<float> scale_dist(0.002f, 0.02f);
  w.codes.resize(static_cast<size_t>(k) * n);
  for (auto& v : w.codes) v = static_cast<uint8_t>(code_dist(rng));
  w.scales.resize(static_cast<size_t>(groups) * n);
  for (auto& v : w.scales) v = to_bits(scale_dist(rng), bf16);
  // Per band of 16 rows and run of 64 columns, packed value i is the code
  // at band-tile position dest[i].
  const auto dest = MarlinWeightUnpermute();
  w.packed.assign(static_cast<size_t>(k / 16) * 2 * n, 0u);
  for (int band = 0; band < k / 16; ++band)
    for (int run = 0; run < n / 64; ++run)
      for (int i = 0; i < kRunValues; ++i) {
        const int r = dest[i] / 64, col = dest[i] % 64;
        const uint32_t code = w.codes[static_cast<size_t>(band * 16 + r) * n + run * 64 + col];
        w.packed[static_cast<size_t>(band) * 2 * n + run * 128 + i / 8] |= code << (4 * (i % 8));
      }
  w.scales_perm.resize(w.scales.size());
  const bool per_channel = groups == 1;
  const int run_len = per_channel ? 32 : 64;
  const auto gi = MarlinGroupedScaleInverse();
  const auto pi = MarlinPerChannelScaleInverse();
  for (size_t base = 0; base < w.scales.size(); base += run_len)
    for (int b = 0; b < run_len; ++b) w.scales_perm[base + (per_channel ? pi[b] : gi[b])] = w.scales[base + b];
  return w;
}

inline std::vector<uint16_t> random_activations(std::mt19937& rng, int m, int k, bool bf16) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint16_t> x(static_cast<size_t>(m) * k);
  for (auto& v : x) v = to_bits(normal(rng), bf16);
  return x;
}

// x W_hat in fp64, W_hat rounded to the activation dtype (FORMAT.md).
inline std::vector<double> host_reference(const std::vector<uint16_t>& x, const HostWeight& w, int m) {
  const int k = w.k, n = w.n;
  std::vector<double> ref(static_cast<size_t>(m) * n, 0.0);
  std::vector<float> wrow(n);
  for (int kk = 0; kk < k; ++kk) {
    for (int nn = 0; nn < n; ++nn) {
      const float s = from_bits(w.scales[static_cast<size_t>(kk / w.group) * n + nn], w.bf16);
      wrow[nn] = from_bits(to_bits((w.codes[static_cast<size_t>(kk) * n + nn] - 8) * s, w.bf16), w.bf16);
    }
    for (int mm = 0; mm < m; ++mm) {
      const double xv = from_bits(x[static_cast<size_t>(mm) * k + kk], w.bf16);
      double* r = &ref[static_cast<size_t>(mm) * n];
      for (int nn = 0; nn < n; ++nn) r[nn] += xv * wrow[nn];
    }
  }
  return ref;
}

// ||y - ref|| / ||ref||; 1e9 where y has a NaN or inf.
inline double relative_error(const std::vector<uint16_t>& y, const std::vector<double>& ref, bool bf16) {
  double num = 0, den = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    const double v = from_bits(y[i], bf16);
    if (!std::isfinite(v)) return 1e9;
    num += (v - ref[i]) * (v - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}
