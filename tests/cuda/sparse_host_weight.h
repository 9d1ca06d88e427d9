// Host-side 2:4 sparse weights for the standalone self-tests (sparse and
// prefill): random 2:4 codes packed as docs/SPARSE_FORMAT.md says (with the
// tables of common/sparse_layout.h), scales in the format's order, and the
// fp64 reference of the pruned, dequantized weight.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "common/float16.h"
#include "common/marlin_layout.h"
#include "common/sparse_layout.h"
#include "host_weight.h"  // to_bits, from_bits

namespace sparse_host {

using namespace jax_marlin;

// splitmix64: fast, and plenty random for test data of ~10^8 entries.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * (next() >> 40) * (1.0f / (1 << 24)); }
};

// Runs fn(begin, end) over [0, n) split across the host's cores.
template <typename Fn>
void parallel_for(int n, Fn fn) {
  const int threads = std::max(1, std::min<int>(n, static_cast<int>(std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) {
    const int b = static_cast<int>(static_cast<long long>(n) * i / threads);
    const int e = static_cast<int>(static_cast<long long>(n) * (i + 1) / threads);
    pool.emplace_back([=] { fn(b, e); });
  }
  for (auto& t : pool) t.join();
}

// A random 2:4 sparse weight, packed. codes (K, N): the dense codes, 8
// (value 0) at pruned positions; each chunk of 4 rows of a column keeps two
// distinct positions, increasing.
struct SparseWeight {
  int k = 0, n = 0;
  std::vector<uint8_t> codes;
  std::vector<uint32_t> values, meta;
};

inline SparseWeight make_weight(int k, int n, Rng& rng) {
  SparseWeight w;
  w.k = k, w.n = n;
  w.codes.assign(static_cast<size_t>(k) * n, 8);
  // kept code and position of (chunk, column, e)
  std::vector<uint8_t> kept_code(static_cast<size_t>(k / 4) * n * 2), kept_pos(kept_code.size());
  constexpr int kPairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  for (int q = 0; q < k / 4; ++q)
    for (int col = 0; col < n; ++col) {
      const uint64_t r = rng.next();
      const int* pair = kPairs[r % 6];
      for (int e = 0; e < 2; ++e) {
        const uint8_t code = static_cast<uint8_t>((r >> (8 + 4 * e)) & 15);
        const size_t i = (static_cast<size_t>(q) * n + col) * 2 + e;
        kept_code[i] = code;
        kept_pos[i] = static_cast<uint8_t>(pair[e]);
        w.codes[static_cast<size_t>(4 * q + pair[e]) * n + col] = code;
      }
    }
  // Pack (docs/SPARSE_FORMAT.md): band b, run r; nibble i of the run's value
  // words holds the kept entry with natural index kValue[i], 2-bit field i of
  // its metadata words the position of kMeta[i]; natural = (q * 64 + c) * 2 + e.
  static const auto kValue = SparseValueNatural();
  static const auto kMeta = SparseMetaNatural();
  w.values.assign(static_cast<size_t>(k / 32) * 2 * n, 0u);
  w.meta.assign(static_cast<size_t>(k / 32) * n, 0u);
  for (int b = 0; b < k / 32; ++b)
    for (int r = 0; r < n / 64; ++r) {
      auto entry = [&](int natural) {
        const int q = natural / (2 * kSparseRunCols), c = (natural / 2) % kSparseRunCols, e = natural % 2;
        return (static_cast<size_t>(8 * b + q) * n + 64 * r + c) * 2 + e;
      };
      uint32_t* vw = &w.values[static_cast<size_t>(b) * 2 * n + 128 * r];
      uint32_t* mw = &w.meta[static_cast<size_t>(b) * n + 64 * r];
      for (int i = 0; i < kSparseRunEntries; ++i) {
        vw[i / 8] |= static_cast<uint32_t>(kept_code[entry(kValue[i])]) << (4 * (i % 8));
        mw[i / 16] |= static_cast<uint32_t>(kept_pos[entry(kMeta[i])]) << (2 * (i % 16));
      }
    }
  return w;
}

// Natural (K / g, N) scales -> the sparse layout's order: the dense grouped
// permutation (runs of 64) for every group size, per-channel included.
inline std::vector<uint16_t> permute_scales(const std::vector<uint16_t>& s) {
  static const auto inverse = MarlinGroupedScaleInverse();
  std::vector<uint16_t> out(s.size());
  for (size_t base = 0; base < s.size(); base += 64)
    for (int b = 0; b < 64; ++b) out[base + inverse[b]] = s[base + b];
  return out;
}

// fp64 reference of x (m, k) @ W_hat, W_hat = (code - 8) * s rounded to the
// activation dtype (pruned entries are code 8: exactly 0).
inline std::vector<double> reference(const SparseWeight& w, const std::vector<uint16_t>& scales, int group,
                              const std::vector<uint16_t>& x, int m, bool bf16) {
  const int k = w.k, n = w.n;
  std::vector<double> ref(static_cast<size_t>(m) * n, 0.0);
  std::vector<double> xd(x.size());
  for (size_t i = 0; i < x.size(); ++i) xd[i] = from_bits(x[i], bf16);
  parallel_for(n / 64, [&](int r0, int r1) {
    const int c0 = 64 * r0, c1 = 64 * r1;
    std::vector<double> wseg(c1 - c0);
    for (int kk = 0; kk < k; ++kk) {
      for (int c = c0; c < c1; ++c) {
        const uint8_t code = w.codes[static_cast<size_t>(kk) * n + c];
        const float s = from_bits(scales[static_cast<size_t>(kk / group) * n + c], bf16);
        wseg[c - c0] = code == 8 ? 0.0 : from_bits(to_bits((code - 8) * s, bf16), bf16);
      }
      for (int mm = 0; mm < m; ++mm) {
        const double xv = xd[static_cast<size_t>(mm) * k + kk];
        if (xv == 0.0) continue;
        double* r = &ref[static_cast<size_t>(mm) * n + c0];
        for (int c = 0; c < c1 - c0; ++c) r[c] += xv * wseg[c];
      }
    }
  });
  return ref;
}

}  // namespace sparse_host
