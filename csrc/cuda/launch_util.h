// Host-side helpers both kernels' dispatch files launch with: device queries
// cached per device, and the resident-block count of a kernel instance.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "marlin_tiles.h"  // log2_exact

namespace jax_marlin::cuda {

// Per-device caches hold this many devices; a larger index is queried every time.
inline constexpr int kCachedDevices = 64;

// An attribute of the current device, cached per device (the query is
// cheap but not free, and launches ask on every call); `fallback` when the
// device cannot be queried.
template <cudaDeviceAttr kAttr>
inline int current_device_attribute(int fallback) {
  static std::atomic<int> cache[kCachedDevices];  // the value + 1; 0: not yet known
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return fallback;
  if (device < kCachedDevices) {
    if (int known = cache[device].load(std::memory_order_relaxed)) return known - 1;
  }
  int v = fallback;
  if (cudaDeviceGetAttribute(&v, kAttr, device) != cudaSuccess) return fallback;
  if (device < kCachedDevices) cache[device].store(v + 1, std::memory_order_relaxed);
  return v;
}

// SMs of the current device.
inline int multiprocessor_count() { return current_device_attribute<cudaDevAttrMultiProcessorCount>(1); }

// The most SMs of any visible device (queried once): workspaces are sized
// for it, so that one size serves every device.
inline int max_multiprocessor_count() {
  static const int most = [] {
    int devices = 0, most = 1;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) return most;
    for (int d = 0; d < devices; ++d) {
      int sms = 0;
      if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d) == cudaSuccess)
        most = std::max(most, sms);
    }
    return most;
  }();
  return most;
}

// Blocks of the grid for `total` (n-tile, k-tile) iterations over `n_tiles`
// n-tiles, with `resident` blocks resident at once. One stripe per resident
// block in general; but where the layer has few n-tiles (at most half the
// slots), n_tiles x S stripes with S = resident / n_tiles, when they still
// fill 7/8 of the slots: then every n-tile is cut into exactly S equal parts
// (floor(b * total / stripes) lands on n-tile boundaries every S blocks), so
// each block adds to one n-tile once and every n-tile has the same number of
// parts, instead of stripes that straddle two n-tiles and leave the last
// arrivals of some tiles a part longer (4096^2 at M = 1: 128 blocks of 4
// k-tiles rather than 132 stripes of 3 or 4, 9.2 -> 7.7 us on the H200;
// 2:4 sparse 11008x4096 M = 1 13.0 -> 11.0 us).
inline int stripe_count(int total, int n_tiles, int resident) {
  if (total <= resident) return total;
  const int parts = resident / n_tiles;
  if (parts >= 2 && 8 * n_tiles * parts >= 7 * resident) return n_tiles * parts;
  return resident;
}

// The A/B switches below: on unless the environment variable is "0".
inline bool not_switched_off(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// Whether launches on the current device allow programmatic dependent
// launch (compute capability 9.0+; the kernels' griddepcontrol needs it).
// JAX_MARLIN_PDL=0 turns it off (an A/B switch for benchmarks), read once.
inline bool programmatic_launch() {
  static const bool enabled = not_switched_off("JAX_MARLIN_PDL");
  return enabled && current_device_attribute<cudaDevAttrComputeCapabilityMajor>(0) >= 9;
}

// Whether launches on the current device bring x into the pipeline by TMA
// (kTmaX tiles; compute capability 9.0+) rather than by cp.async.
// JAX_MARLIN_TMA=0 turns it off (the cp.async path that Ampere runs, for
// tests and A/B benchmarks on Hopper), read once.
inline bool x_by_tma() {
  static const bool enabled = not_switched_off("JAX_MARLIN_TMA");
  return enabled && current_device_attribute<cudaDevAttrComputeCapabilityMajor>(0) >= 9;
}

// Whether this build has sm_90a code (JAX_MARLIN_SM90A_BUILD: CMake
// defines it when its CUDA architectures name 90a), which the wgmma tiles
// need: wgmma exists only there.
#ifdef JAX_MARLIN_SM90A_BUILD
inline constexpr bool kSm90aBuild = true;
#else
inline constexpr bool kSm90aBuild = false;
#endif

// Whether launches on the current device use the wgmma tiles where the
// dispatch has them: a build with sm_90a code, a device of compute
// capability exactly 9.0 (the only one sm_90a code runs on), and
// JAX_MARLIN_WGMMA=0 not set (an A/B switch, read once).
inline bool wgmma_launches() {
  static const bool enabled = not_switched_off("JAX_MARLIN_WGMMA");
  return kSm90aBuild && enabled && current_device_attribute<cudaDevAttrComputeCapabilityMajor>(0) == 9 &&
         current_device_attribute<cudaDevAttrComputeCapabilityMinor>(-1) == 0;
}

// Launches kernel<<<blocks, threads, smem, stream>>>(params); where
// `overlap` (the kernel waits for its predecessor itself:
// overlap_previous_grid in stripe.cuh) and the device has it, as a
// programmatic dependent launch, which may start before the previous kernel
// in the stream ends. In a CUDA graph capture that is a programmatic edge.
// params.overlapped tells the kernel which of the two it got.
// `extra`: the kernel's parameters after the first (a kTmaX kernel's
// tensor map).
template <typename Params, typename... Extra>
cudaError_t launch_overlapping(void (*kernel)(Params, Extra...), int blocks, int threads, int smem,
                               cudaStream_t stream, Params params, bool overlap, Extra... extra) {
  params.overlapped = overlap && programmatic_launch();
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = params.overlapped ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, params, extra...);
}

// The tensor map a kTmaX kernel (marlin_kernel_tma_x) reads x through: x
// (rows, k) 16-bit row-major, boxes of `box_k` elements of K by `tile_m`
// rows, with the 128-byte swizzle where `swizzle128` (the tiles' layout:
// box_k 64, a 128-byte half) or none (box_k 8, a 16-byte column, for
// tools). Rows past `rows` read as
// zeros. The driver's encoder is looked up through the runtime once (the
// extension does not link libcuda). A host call, no device work.
inline cudaError_t encode_x_tensor_map(CUtensorMap* map, const void* x, int rows, int k,
                                       int box_k, int tile_m, bool swizzle128) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(k) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_k), static_cast<cuuint32_t>(tile_m)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(x), dims,
                            strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Launches a tile's kernel for one chunk (launch_overlapping, Tile's threads
// and shared memory); a kTmaX kernel also gets the tensor map of the
// chunk's x (params.x, params.rows x params.k), made here for every launch:
// x moves from call to call (64-column boxes, the 128-byte swizzled halves
// that ldmatrix and wgmma's descriptors read).
// The dispatch picks kTmaX tiles only where x_by_tma() holds.
template <typename Tile, typename Kernel, typename Params>
cudaError_t launch_tile(Kernel kernel, cudaStream_t stream, const Params& params, bool overlap) {
  if constexpr (Tile::kTmaX) {
    alignas(64) CUtensorMap x_map;
    const cudaError_t err = encode_x_tensor_map(&x_map, params.x, params.rows, params.k, Tile::kXBoxK,
                                                Tile::kTileM, Tile::kXBoxK == 64);
    if (err != cudaSuccess) return err;
    return launch_overlapping(kernel, params.stripes, Tile::kBlockThreads, Tile::kSmemBytes, stream, params,
                              overlap, x_map);
  } else {
    return launch_overlapping(kernel, params.stripes, Tile::kBlockThreads, Tile::kSmemBytes, stream, params,
                              overlap);
  }
}

// How many blocks of `Kernel` (launched with Tile's threads and shared
// memory) an SM holds, on the current device, at most Tile::kBlocksPerSM. The
// first call per device raises the kernel's dynamic shared-memory limit (a
// per-device setting) and asks the occupancy calculator; later calls read
// the cache (one per instantiation).
template <auto Kernel, typename Tile>
cudaError_t resident_blocks_per_sm(int* out) {
  static std::atomic<int> cache[kCachedDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::atomic<int>* cached = device < kCachedDevices ? &cache[device] : nullptr;
  int resident = cached ? cached->load(std::memory_order_acquire) : 0;
  if (resident == 0) {
    err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, Kernel, Tile::kBlockThreads,
                                                        Tile::kSmemBytes);
    if (err != cudaSuccess) return err;
    if (resident == 0) return cudaErrorInvalidConfiguration;
    if (resident > Tile::kBlocksPerSM) resident = Tile::kBlocksPerSM;
    if (cached) cached->store(resident, std::memory_order_release);
  }
  *out = resident;
  return cudaSuccess;
}

}  // namespace jax_marlin::cuda
