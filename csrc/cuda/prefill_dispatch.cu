// Host side of the prefill kernel: checks, the tensor map of x, the launch.
#include <tuple>

#include "launch_util.h"
#include "prefill_kernel.cuh"
#include "prefill_launch.h"

namespace jax_marlin::cuda {
namespace {

// The tile variants, in PrefillProblem::variant's numbering.
using Variants = std::tuple<PrefillTile<4, 1>, PrefillTile<2, 2>, PrefillTile<2, 1>>;
static_assert(std::tuple_size_v<Variants> == kPrefillVariants, "prefill_launch.h names every variant");

// fn(tile) for variant v's tile type (an empty tag object).
template <typename Fn>
auto with_variant(int v, Fn&& fn) {
  switch (v) {
    case 0:
      return fn(std::tuple_element_t<0, Variants>{});
    case 1:
      return fn(std::tuple_element_t<1, Variants>{});
    default:
      return fn(std::tuple_element_t<2, Variants>{});
  }
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
  PrefillParams<T> p{static_cast<const char*>(pr.packed), static_cast<const T*>(pr.scales), static_cast<T*>(pr.y),
                     pr.m, pr.k, pr.n, kGrouped ? log2_exact(pr.group_size) : 0};
  // M tiles fastest: the blocks resident at once share few weight tiles
  // (read from HBM once, then from L2) and all of x (which L2 holds).
  const dim3 grid((pr.m + Tile::kTileM - 1) / Tile::kTileM, pr.n / Tile::kTileN);
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

}  // namespace

const char* prefill_unsupported_reason(const PrefillProblem& pr) {
  if (pr.variant < 0 || pr.variant >= kPrefillVariants) return "no such prefill tile variant";
  // The Marlin kernel's shape rules (K % 64 is also the prefill stage's depth).
  if (const char* why = unsupported_reason(pr.m, pr.k, pr.n, pr.group_size)) return why;
  const int tile_n = with_variant(pr.variant, [](auto tile) { return decltype(tile)::kTileN; });
  if (pr.n % tile_n != 0) return "N must be a multiple of the prefill tile's width";
  if (!wgmma_launches()) return "the prefill kernel needs sm_90a code and a compute capability 9.0 device";
  return nullptr;
}

int pick_prefill_variant(const PrefillProblem& problem) {
  // A block holds its SM for the whole of K, so a launch costs whole waves of
  // tiles. A 4x1 tile (256 columns) takes ~1.5x the time of a 2x1 tile (128
  // columns; H100 self-test bench, session 27): cost = waves x 3 or x 2, ties
  // to 2x1. Where the cheaper one's tiles leave more than half the SMs idle,
  // the chunks, which stripe K over every SM, are faster.
  const int sms = multiprocessor_count();
  struct Candidate {
    int variant, tile_time;  // relative
  };
  PrefillProblem p = problem;
  int best = -1;
  long long best_cost = 0, best_tiles = 0;
  for (const Candidate c : {Candidate{2, 2}, Candidate{0, 3}}) {
    p.variant = c.variant;
    if (prefill_unsupported_reason(p) != nullptr) continue;
    const long long tiles = with_variant(c.variant, [&](auto tile) {
      using Tile = decltype(tile);
      return static_cast<long long>((p.m + Tile::kTileM - 1) / Tile::kTileM) * (p.n / Tile::kTileN);
    });
    const long long cost = (tiles + sms - 1) / sms * c.tile_time;
    if (best < 0 || cost < best_cost) best = c.variant, best_cost = cost, best_tiles = tiles;
  }
  return best >= 0 && 2 * best_tiles >= sms ? best : -1;
}

cudaError_t prepare_prefill_kernels() {
  if (!wgmma_launches()) return cudaSuccess;
  for (int v = 0; v < kPrefillVariants; ++v) {
    const cudaError_t err = with_variant(v, [](auto tile) {
      using Tile = decltype(tile);
      for (cudaError_t e : {prepare<half, Tile, false>(), prepare<half, Tile, true>(),
                            prepare<__nv_bfloat16, Tile, false>(), prepare<__nv_bfloat16, Tile, true>()})
        if (e != cudaSuccess) return e;
      return cudaSuccess;
    });
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t prefill_matmul(const PrefillProblem& pr, cudaStream_t stream) {
  if (prefill_unsupported_reason(pr) != nullptr) return cudaErrorInvalidValue;
  return with_variant(pr.variant, [&](auto tile) { return launch_dtype<decltype(tile)>(pr, stream); });
}

}  // namespace jax_marlin::cuda
