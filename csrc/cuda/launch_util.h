// Host-side helpers both kernels' dispatch files launch with: device queries
// cached per device, and the resident-block count of a kernel instance.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

namespace jax_marlin::cuda {

// Per-device caches hold this many devices; a larger index is queried every time.
inline constexpr int kCachedDevices = 64;

// An attribute of the current device, cached per device (the query is
// cheap but not free, and launches ask on every call); `fallback` when the
// device cannot be queried.
template <cudaDeviceAttr kAttr>
inline int current_device_attribute(int fallback) {
  static std::atomic<int> cache[kCachedDevices];  // 0: not yet known
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return fallback;
  if (device < kCachedDevices) {
    if (int v = cache[device].load(std::memory_order_relaxed)) return v;
  }
  int v = fallback;
  if (cudaDeviceGetAttribute(&v, kAttr, device) != cudaSuccess) return fallback;
  if (device < kCachedDevices) cache[device].store(v, std::memory_order_relaxed);
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

// log2 of a power of two (the group size).
inline int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
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

// Whether launches on the current device allow programmatic dependent
// launch (compute capability 9.0+; the kernels' griddepcontrol needs it).
// JAX_MARLIN_PDL=0 turns it off (an A/B switch for benchmarks), read once.
inline bool programmatic_launch() {
  static const bool enabled = [] {
    const char* v = std::getenv("JAX_MARLIN_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled && current_device_attribute<cudaDevAttrComputeCapabilityMajor>(0) >= 9;
}

// Launches kernel<<<blocks, threads, smem, stream>>>(params); where
// `overlap` (the kernel waits for its predecessor itself:
// overlap_previous_grid in stripe.cuh) and the device has it, as a
// programmatic dependent launch, which may start before the previous kernel
// in the stream ends. In a CUDA graph capture that is a programmatic edge.
// params.overlapped tells the kernel which of the two it got.
template <typename Params>
cudaError_t launch_overlapping(void (*kernel)(Params), int blocks, int threads, int smem,
                               cudaStream_t stream, Params params, bool overlap) {
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
  return cudaLaunchKernelEx(&config, kernel, params);
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
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, Kernel, Tile::kThreads,
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
