// The "jax_marlin_matmul" and "jax_marlin_sparse_matmul" FFI targets on CUDA: validate the operands with the
// checks every backend shares, then hand raw pointers to the launchers. Also
// "jax_marlin_dequantize" (CUDA only), the large-M dense path's first half.
#include <cuda_runtime.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common/marlin_shape.h"
#include "cuda/marlin_cuda_ffi.h"
#include "cuda/marlin_launch.h"
#include "cuda/sparse_launch.h"

namespace ffi = xla::ffi;

namespace jax_marlin::cuda {
namespace {

// The lock counters of one compiled call: a zeroed array on every visible
// device, made once when XLA instantiates the call. Execution picks the one
// on its stream's device, so a program replicated over several GPUs never
// shares counters between them. (The instantiate stage is not told its
// device reliably, and allocating in execute would break graph capture.)
struct LockBuffer {
  static ffi::TypeId id;
  std::vector<int*> per_device;
  size_t count = 0;

  ~LockBuffer() {
    int current = 0;
    if (cudaGetDevice(&current) != cudaSuccess) return;
    for (size_t d = 0; d < per_device.size(); ++d) {
      if (per_device[d] == nullptr) continue;
      cudaSetDevice(static_cast<int>(d));
      cudaFree(per_device[d]);
    }
    cudaSetDevice(current);
  }
};
ffi::TypeId LockBuffer::id = {};
const XLA_FFI_TypeInfo kLockBufferInfo = ffi::MakeTypeInfo<LockBuffer>();

// `target` names the FFI target in messages; `prepare` sets up its kernels.
ffi::ErrorOr<std::unique_ptr<LockBuffer>> MakeLocks(const char* target, cudaError_t (*prepare)(),
                                                     int64_t rows, int64_t cols) {
  if (rows < 0 || cols <= 0 || cols % 64 != 0) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        std::string(target) + " (CUDA): bad rows/cols attributes " + std::to_string(rows) + ", " +
        std::to_string(cols)));
  }
  auto buffer = std::make_unique<LockBuffer>();
  buffer->count = rows == 0 ? 0 : lock_count(static_cast<int>(rows), static_cast<int>(cols));
  if (buffer->count == 0) return std::move(buffer);

  int current = 0, devices = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess) err = cudaGetDeviceCount(&devices);
  if (err == cudaSuccess) buffer->per_device.assign(devices, nullptr);
  for (int d = 0; d < devices && err == cudaSuccess; ++d) {
    err = cudaSetDevice(d);
    if (err == cudaSuccess) err = cudaMalloc(&buffer->per_device[d], buffer->count * sizeof(int));
    if (err == cudaSuccess) err = cudaMemset(buffer->per_device[d], 0, buffer->count * sizeof(int));
    // XLA's streams do not wait on the legacy stream the memset ran on.
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    // Kernel attributes now, not on first execution (which may be captured).
    if (err == cudaSuccess) err = prepare();
  }
  cudaSetDevice(current);
  if (err != cudaSuccess) {
    return ffi::Unexpected(ffi::Error::Internal(
        std::string(target) + " (CUDA): lock buffer: " + cudaGetErrorString(err)));
  }
  return std::move(buffer);
}

ffi::ErrorOr<std::unique_ptr<LockBuffer>> InstantiateLocks(int64_t rows, int64_t cols) {
  return MakeLocks("jax_marlin_matmul", &prepare_kernels, rows, cols);
}

// The sparse target's state is the same lock buffer (same FFI type): the
// sparse kernel counts its shared n-tiles exactly as the dense one does.
ffi::ErrorOr<std::unique_ptr<LockBuffer>> InstantiateSparseLocks(int64_t rows, int64_t cols) {
  return MakeLocks("jax_marlin_sparse_matmul", &prepare_sparse_kernels, rows, cols);
}

// Executions that found their stream being captured into a CUDA graph (an
// XLA command buffer): lets tests check that the kernel really ran inside one.
std::atomic<int64_t> g_captured_calls{0};

// Whether `stream` is being captured into a CUDA graph; counts the captured
// executions. A captured call's launch may not overlap its predecessor
// (MarlinProblem::may_overlap): XLA traces a custom call into a CUDA graph of
// its own, where the launch has no predecessor to overlap, so the kernel
// would only pay for its prefetch.
bool count_if_captured(cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
      capture == cudaStreamCaptureStatusActive) {
    g_captured_calls.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  return false;
}

ffi::Error MarlinMatmulCudaImpl(cudaStream_t stream, LockBuffer* locks, ffi::AnyBuffer x,
                                ffi::Buffer<ffi::S32> packed, ffi::AnyBuffer scales,
                                ffi::Result<ffi::AnyBuffer> y,
                                ffi::Result<ffi::Buffer<ffi::F32>> workspace, int64_t rows,
                                int64_t cols) {
  MarlinShape shape;
  if (ffi::Error err = CheckMarlinOperands(x.element_type(), x.dimensions(), packed.element_type(),
                                           packed.dimensions(), scales.element_type(),
                                           scales.dimensions(), y->element_type(), y->dimensions(),
                                           &shape);
      err.failure()) {
    return err;
  }
  if (shape.m == 0) return ffi::Error::Success();

  const int m = static_cast<int>(shape.m), k = static_cast<int>(shape.k),
            n = static_cast<int>(shape.n), group = static_cast<int>(shape.group_size);
  if (const char* why = unsupported_reason(m, k, n, group)) {
    return ffi::Error::InvalidArgument(std::string("jax_marlin_matmul (CUDA): ") + why);
  }
  if (rows != shape.m || cols != shape.n || locks->count < lock_count(m, n)) {
    return ffi::Error::InvalidArgument(
        "jax_marlin_matmul (CUDA): the call was instantiated for (rows, cols) = (" +
        std::to_string(rows) + ", " + std::to_string(cols) + ") but got y of shape (" +
        std::to_string(shape.m) + ", " + std::to_string(shape.n) + ")");
  }
  if (const size_t needed = workspace_floats(m, k, n); workspace->element_count() < needed) {
    return ffi::Error::InvalidArgument("jax_marlin_matmul (CUDA): workspace needs " +
                                       std::to_string(needed) + " floats, got " +
                                       std::to_string(workspace->element_count()));
  }

  MarlinProblem problem;
  problem.dtype = shape.dtype == ffi::DataType::BF16 ? ActDtype::kBFloat16 : ActDtype::kFloat16;
  problem.x = x.untyped_data();
  problem.packed = packed.typed_data();
  problem.scales = scales.untyped_data();
  problem.y = y->untyped_data();
  problem.workspace = workspace->typed_data();
  // XLA makes the executing device current (cudaStreamGetDevice is not
  // allowed while the stream is being captured into a command buffer).
  int device = -1;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_marlin_matmul (CUDA): current device: ") +
                                cudaGetErrorString(err));
  }
  if (device < 0 || device >= static_cast<int>(locks->per_device.size())) {
    return ffi::Error::Internal("jax_marlin_matmul (CUDA): the call runs on device " +
                                std::to_string(device) + ", which had no lock buffer made for it");
  }
  problem.locks = locks->per_device[device];
  problem.locks_zeroed = true;
  problem.may_overlap = !count_if_captured(stream);
  problem.m = m;
  problem.k = k;
  problem.n = n;
  problem.group_size = group;

  if (cudaError_t err = marlin_matmul(problem, stream); err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_marlin_matmul (CUDA): kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// The "jax_marlin_sparse_matmul" target: the operand checks the CPU handler
// makes (CheckSparseOperands), then the same lock/workspace contract as the
// dense target.
ffi::Error SparseMatmulCudaImpl(cudaStream_t stream, LockBuffer* locks, ffi::AnyBuffer x,
                                ffi::Buffer<ffi::S32> values, ffi::Buffer<ffi::S32> meta,
                                ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y,
                                ffi::Result<ffi::Buffer<ffi::F32>> workspace, int64_t rows,
                                int64_t cols) {
  constexpr const char* kWho = "jax_marlin_sparse_matmul (CUDA): ";
  MarlinShape shape;
  if (ffi::Error err = CheckSparseOperands(x.element_type(), x.dimensions(), values.element_type(),
                                           values.dimensions(), meta.element_type(),
                                           meta.dimensions(), scales.element_type(),
                                           scales.dimensions(), y->element_type(), y->dimensions(),
                                           &shape);
      err.failure()) {
    return err;
  }
  if (shape.m == 0) return ffi::Error::Success();

  const int m = static_cast<int>(shape.m), k = static_cast<int>(shape.k),
            n = static_cast<int>(shape.n), group = static_cast<int>(shape.group_size);
  if (const char* why = sparse_unsupported_reason(m, k, n, group)) {
    return ffi::Error::InvalidArgument(std::string(kWho) + why);
  }
  if (rows != shape.m || cols != shape.n || locks->count < lock_count(m, n)) {
    return ffi::Error::InvalidArgument(
        std::string(kWho) + "the call was instantiated for (rows, cols) = (" +
        std::to_string(rows) + ", " + std::to_string(cols) + ") but got y of shape (" +
        std::to_string(shape.m) + ", " + std::to_string(shape.n) + ")");
  }
  if (const size_t needed = sparse_workspace_floats(m, k, n); workspace->element_count() < needed) {
    return ffi::Error::InvalidArgument(std::string(kWho) + "workspace needs " +
                                       std::to_string(needed) + " floats, got " +
                                       std::to_string(workspace->element_count()));
  }
  int device = -1;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) {
    return ffi::Error::Internal(std::string(kWho) + "current device: " + cudaGetErrorString(err));
  }
  if (device < 0 || device >= static_cast<int>(locks->per_device.size())) {
    return ffi::Error::Internal(std::string(kWho) + "the call runs on device " +
                                std::to_string(device) + ", which had no lock buffer made for it");
  }
  SparseProblem problem;
  problem.dtype = shape.dtype == ffi::DataType::BF16 ? ActDtype::kBFloat16 : ActDtype::kFloat16;
  problem.x = x.untyped_data();
  problem.values = values.typed_data();
  problem.meta = meta.typed_data();
  problem.scales = scales.untyped_data();
  problem.y = y->untyped_data();
  problem.workspace = workspace->typed_data();
  problem.locks = locks->per_device[device];
  problem.locks_zeroed = true;
  problem.may_overlap = !count_if_captured(stream);
  problem.m = m;
  problem.k = k;
  problem.n = n;
  problem.group_size = group;
  if (cudaError_t err = sparse_matmul(problem, stream); err != cudaSuccess) {
    return ffi::Error::Internal(std::string(kWho) + "kernel launch failed: " +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// The "jax_marlin_dequantize" target: the Marlin weight as a dense (K, N)
// matrix, for the large-M path (dequantize, then XLA's GEMM). Stateless.
ffi::Error MarlinDequantizeCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::S32> packed,
                                    ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> w) {
  MarlinShape shape;
  if (ffi::Error err = CheckDequantizeOperands(packed.element_type(), packed.dimensions(),
                                               scales.element_type(), scales.dimensions(),
                                               w->element_type(), w->dimensions(), &shape);
      err.failure()) {
    return err;
  }
  DequantizeProblem problem;
  problem.dtype = shape.dtype == ffi::DataType::BF16 ? ActDtype::kBFloat16 : ActDtype::kFloat16;
  problem.packed = packed.typed_data();
  problem.scales = scales.untyped_data();
  problem.w = w->untyped_data();
  problem.k = static_cast<int>(shape.k);
  problem.n = static_cast<int>(shape.n);
  problem.group_size = static_cast<int>(shape.group_size);
  if (cudaError_t err = marlin_dequantize(problem, stream); err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_marlin_dequantize (CUDA): kernel launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_TypeId* lock_buffer_type_id() { return &LockBuffer::id; }
int64_t captured_call_count() { return g_captured_calls.load(std::memory_order_relaxed); }
const XLA_FFI_TypeInfo* lock_buffer_type_info() { return &kLockBufferInfo; }

}  // namespace jax_marlin::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinMatmulCudaInstantiate, jax_marlin::cuda::InstantiateLocks,
                              xla::ffi::Ffi::BindInstantiate()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols"));

// Command-buffer compatible: the handler only enqueues kernel launches on the
// given stream (no host sync, no allocation, no host reads of device data),
// and the lock buffer it hands them outlives any recorded graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinMatmulCuda, jax_marlin::cuda::MarlinMatmulCudaImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::State<jax_marlin::cuda::LockBuffer>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseMatmulCudaInstantiate, jax_marlin::cuda::InstantiateSparseLocks,
                              xla::ffi::Ffi::BindInstantiate()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols"));

// 2:4 sparse weights: x, values, meta, scales -> y, workspace. Command-buffer
// compatible for the same reasons as the dense handler.
XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseMatmulCuda, jax_marlin::cuda::SparseMatmulCudaImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::State<jax_marlin::cuda::LockBuffer>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols"),
                              {xla::ffi::Traits::kCmdBufferCompatible});

// packed, scales -> w (K, N). Command-buffer compatible: one launch, nothing else.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinDequantizeCuda, jax_marlin::cuda::MarlinDequantizeCudaImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
