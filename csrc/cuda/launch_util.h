// Host-side helpers both kernels' dispatch files launch with: device queries
// cached per device, and the resident-block count of a kernel instance.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

namespace jax_marlin::cuda {

// Per-device caches hold this many devices; a larger index is queried every time.
inline constexpr int kCachedDevices = 64;

// SMs of the current device. Cached: the attribute query is cheap but not
// free, and this runs on every call.
inline int multiprocessor_count() {
  static std::atomic<int> cache[kCachedDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (device < kCachedDevices) {
    if (int v = cache[device].load(std::memory_order_relaxed)) return v;
  }
  int sms = 1;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (device < kCachedDevices) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

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

// How many blocks of `Kernel` (launched with Tile's threads and shared
// memory) an SM holds, on the current device, at most Tile::kBlocksPerSM. The
// first call per device raises the kernel's dynamic shared-memory limit (a
// per-device setting) and asks the occupancy calculator; later calls read
// the cache (one per instantiation). The grid must never exceed what is
// resident at once: a block may wait on another.
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
