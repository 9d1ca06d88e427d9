// Host side of the prefill kernel: checks, the tensor map of x, the launch.
#include <algorithm>
#include <tuple>

#include "launch_util.h"
#include "prefill_kernel.cuh"
#include "prefill_launch.h"

namespace jax_marlin::cuda {
namespace {

// The tile variants, in PrefillProblem::variant's numbering (dense; the 2:4
// form of each is Sparse<Tile>).
using Variants = std::tuple<PrefillTile<4, 1>, PrefillTile<2, 2>, PrefillTile<2, 1>, PrefillTile<4, 1, 64>,
                            PrefillTile<2, 1, 64>>;
template <typename Tile>
using Sparse = PrefillTile<Tile::kConsumerWarpgroups, Tile::kSlabsPerWarpgroup, Tile::kTileM, true>;
// The 2x2 tile (variant 1, the bench's alone) has no 2:4 form.
template <typename Tile>
constexpr bool kHasSparse = Tile::kSlabsPerWarpgroup == 1;
static_assert(std::tuple_size_v<Variants> == kPrefillVariants, "prefill_launch.h names every variant");

// fn(tile) for variant v's tile type (an empty tag object).
template <typename Fn>
auto with_variant(int v, Fn&& fn) {
  switch (v) {
    case 0:
      return fn(std::tuple_element_t<0, Variants>{});
    case 1:
      return fn(std::tuple_element_t<1, Variants>{});
    case 2:
      return fn(std::tuple_element_t<2, Variants>{});
    case 3:
      return fn(std::tuple_element_t<3, Variants>{});
    default:
      return fn(std::tuple_element_t<4, Variants>{});
  }
}

// A split's part of a tile in the workspace, in bytes (fp32 accumulators).
size_t part_bytes(int variant) {
  return with_variant(variant, [](auto tile) { return sizeof(float4) * decltype(tile)::kPartUnits; });
}

// The instance's shared-memory limit, set once per device (and a check that
// one block fits an SM), as for the Marlin kernel's instances.
template <typename T, typename Tile, bool kGrouped>
cudaError_t prepare() {
  int resident = 0;
  return resident_blocks_per_sm<prefill_kernel<T, Tile, kGrouped>, Tile>(&resident);
}

template <typename T, typename Tile, bool kGrouped>
cudaError_t launch(const PrefillProblem& pr, cudaStream_t stream) {
  cudaError_t err = prepare<T, Tile, kGrouped>();
  if (err != cudaSuccess) return err;
  alignas(64) CUtensorMap x_map;
  err = encode_x_tensor_map(&x_map, pr.x, pr.m, pr.k, Tile::kTileK, Tile::kTileM, true);
  if (err != cudaSuccess) return err;
  PrefillParams<T> p{static_cast<const char*>(pr.packed),
                     static_cast<const char*>(pr.meta),
                     static_cast<const T*>(pr.scales),
                     static_cast<T*>(pr.y),
                     pr.m,
                     pr.k,
                     pr.n,
                     kGrouped ? log2_exact(pr.group_size) : 0,
                     pr.splits,
                     reinterpret_cast<float4*>(pr.partials),
                     pr.counters};
  // M tiles fastest: the blocks resident at once share few weight tiles
  // (read from HBM once, then from L2) and all of x (which L2 holds).
  const dim3 grid((pr.m + Tile::kTileM - 1) / Tile::kTileM, pr.n / Tile::kTileN, pr.splits);
  prefill_kernel<T, Tile, kGrouped><<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(p, x_map);
  return cudaGetLastError();
}

template <typename Tile>
cudaError_t launch_dtype(const PrefillProblem& pr, cudaStream_t stream) {
  const bool grouped = pr.group_size != pr.k;
  if (pr.dtype == ActDtype::kFloat16)
    return grouped ? launch<half, Tile, true>(pr, stream) : launch<half, Tile, false>(pr, stream);
  return grouped ? launch<__nv_bfloat16, Tile, true>(pr, stream) : launch<__nv_bfloat16, Tile, false>(pr, stream);
}

// Both formats' instances of a variant, dtypes and scale forms (prepare).
template <typename Tile>
cudaError_t prepare_variant() {
  for (cudaError_t e : {prepare<half, Tile, false>(), prepare<half, Tile, true>(),
                        prepare<__nv_bfloat16, Tile, false>(), prepare<__nv_bfloat16, Tile, true>()})
    if (e != cudaSuccess) return e;
  return cudaSuccess;
}

}  // namespace

PrefillTileSize prefill_tile_size(int variant) {
  return with_variant(variant, [](auto tile) {
    using Tile = decltype(tile);
    return PrefillTileSize{Tile::kTileM, Tile::kTileN};
  });
}

const char* prefill_unsupported_reason(const PrefillProblem& pr) {
  if (pr.variant < 0 || pr.variant >= kPrefillVariants) return "no such prefill tile variant";
  // The Marlin kernel's shape rules (K % 64 is also the prefill stage's depth).
  if (const char* why = unsupported_reason(pr.m, pr.k, pr.n, pr.group_size)) return why;
  if (pr.n % prefill_tile_size(pr.variant).cols != 0) return "N must be a multiple of the prefill tile's width";
  if (pr.splits < 1 || pr.splits > kPrefillMaxSplits || pr.splits > pr.k / 64)
    return "the K split must be 1 to kPrefillMaxSplits blocks a tile, each with at least 64 of K";
  if (pr.splits > 1 && !with_variant(pr.variant, [](auto tile) { return decltype(tile)::kSplits; }))
    return "this prefill tile variant has no K split";
  if (pr.meta != nullptr && !with_variant(pr.variant, [](auto tile) { return kHasSparse<decltype(tile)>; }))
    return "this prefill tile variant has no 2:4 form";
  if (!wgmma_launches()) return "the prefill kernel needs sm_90a code and a compute capability 9.0 device";
  return nullptr;
}

namespace {
// Tiles of y an m x n output takes in `tile`s.
long long tiles_of(PrefillTileSize tile, int m, int n) {
  return static_cast<long long>((m + tile.rows - 1) / tile.rows) * (n / tile.cols);
}
}  // namespace

int prefill_tiles(const PrefillProblem& pr) {
  return static_cast<int>(tiles_of(prefill_tile_size(pr.variant), pr.m, pr.n));
}

size_t prefill_partial_floats(const PrefillProblem& pr) {
  return pr.splits > 1 ? static_cast<size_t>(prefill_tiles(pr)) * pr.splits * part_bytes(pr.variant) / 4 : 0;
}

size_t prefill_partial_floats_bound() {
  size_t widest = 0;
  for (int v = 0; v < kPrefillVariants; ++v) widest = std::max(widest, part_bytes(v) / 4);
  return static_cast<size_t>(max_multiprocessor_count()) * widest;
}

PrefillShape prefill_shape_for(int m, int k, int n, int group_size, int sms, bool sparse) {
  // A block holds its SM for its whole share of K, so a launch costs whole
  // waves of blocks: cost = waves x stages a block x a 64-deep stage's time,
  // in units of ~0.05 us, plus, with a K split (only where the tiles leave
  // SMs idle, and never more blocks than SMs), its reduction: every split
  // stores its part and the last reads all of them, at 3 KB a unit.
  // Dense stage times: 128-row 2x1 8, 4x1 12; 64-row 2x1 6, 4x1 8. The
  // gate below was fitted to the H100 prefill bench of session 28
  // (`prefill_selftest --bench`, 192 cases from M = 64; on the 70B layers
  // each pick within 11% of the fastest row, 0.6% on the geometric mean;
  // scripts/prefill_compare.py); a 64-row 2x1 stage of 5 fitted all
  // layers a little better but lost 8192^2 at M = 64 (q21s2 33.4 us
  // against q41s4 28.1 through JAX). The 2:4 times are
  // half the dense ones (an estimate: on the 2:4 self-test's bench its
  // prefill form ran 1.4-1.6x the 2:4 chunks at M = 128-256 on the 70B
  // shapes, 3% slower at M = 64). The 2x1 tiles come first, so ties go to
  // them.
  struct Candidate {
    int variant;
    long long dense_time, sparse_time;
  };
  constexpr Candidate kCandidates[] = {{2, 8, 4}, {0, 12, 6}, {4, 6, 3}, {3, 8, 4}};
  constexpr long long kPartBytesPerUnit = 3 * 1024;
  if (sms < 1 || unsupported_reason(m, k, n, group_size) != nullptr) return {};
  const long long k_tiles = k / 64;
  PrefillShape best;
  long long best_cost = 0;
  for (const Candidate c : kCandidates) {
    const PrefillTileSize tile = prefill_tile_size(c.variant);
    if (n % tile.cols != 0) continue;
    const long long stage_time = sparse ? c.sparse_time : c.dense_time;
    const long long tiles = tiles_of(tile, m, n);
    for (int splits = 1; splits <= kPrefillMaxSplits && splits <= k_tiles; ++splits) {
      if (splits > 1 && tiles * splits > sms) break;
      const long long waves = (tiles * splits + sms - 1) / sms, stages = (k_tiles + splits - 1) / splits;
      long long cost = waves * stages * stage_time;
      if (splits > 1) cost += (1 + splits) * static_cast<long long>(part_bytes(c.variant)) / kPartBytesPerUnit;
      if (best.variant < 0 || cost < best_cost) best = {c.variant, splits}, best_cost = cost;
    }
  }
  // The chunks, which stripe K over every SM, are faster where this launch
  // makes under a third (dense; 2:4: half) of the output that full waves of
  // 4x1 tiles of the same format would in the same time: a partial wave, or
  // rows of x that fill a tile only in part.
  if (best.variant < 0) return best;
  const PrefillTileSize widest = prefill_tile_size(0);
  const long long stage_4x1 = sparse ? kCandidates[1].sparse_time : kCandidates[1].dense_time;
  const long long full_rate_output = best_cost * sms * widest.rows * widest.cols / (stage_4x1 * k_tiles);
  const long long gate = sparse ? 2 : 3;
  return gate * static_cast<long long>(m) * n >= full_rate_output ? best : PrefillShape{};
}

PrefillShape pick_prefill_shape(const PrefillProblem& problem) {
  if (!wgmma_launches()) return {};
  return prefill_shape_for(problem.m, problem.k, problem.n, problem.group_size, multiprocessor_count(),
                           problem.meta != nullptr);
}

PrefillProblem routed_prefill_problem(PrefillProblem p, float* workspace, int* locks) {
  static const bool enabled = not_switched_off("JAX_MARLIN_PREFILL");
  p.variant = -1, p.splits = 1;
  if (!enabled || p.m < kPrefillMinRows) return p;
  const PrefillShape shape = pick_prefill_shape(p);
  p.variant = shape.variant, p.splits = shape.splits;
  p.partials = workspace, p.counters = locks;
  // The workspace was sized for the most a K split asks.
  if (p.variant >= 0 && prefill_partial_floats(p) > prefill_partial_floats_bound()) p.variant = -1;
  return p;
}

size_t routed_prefill_workspace_floats(int m) { return m >= kPrefillMinRows ? prefill_partial_floats_bound() : 0; }

cudaError_t prepare_prefill_kernels() {
  if (!wgmma_launches()) return cudaSuccess;
  for (int v = 0; v < kPrefillVariants; ++v) {
    const cudaError_t err = with_variant(v, [](auto tile) {
      using Tile = decltype(tile);
      cudaError_t e = prepare_variant<Tile>();
      if constexpr (kHasSparse<Tile>) {
        if (e == cudaSuccess) e = prepare_variant<Sparse<Tile>>();
      }
      return e;
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t prefill_matmul(const PrefillProblem& pr, cudaStream_t stream) {
  if (prefill_unsupported_reason(pr) != nullptr) return cudaErrorInvalidValue;
  // A K split's scratch is the caller's (PrefillProblem::partials, counters).
  if (pr.splits > 1 && (pr.partials == nullptr || pr.counters == nullptr)) return cudaErrorInvalidValue;
  return with_variant(pr.variant, [&](auto tile) {
    using Tile = decltype(tile);
    if constexpr (kHasSparse<Tile>) {
      if (pr.meta != nullptr) return launch_dtype<Sparse<Tile>>(pr, stream);
    }
    return launch_dtype<Tile>(pr, stream);
  });
}

}  // namespace jax_marlin::cuda
