// The "jax_marlin_matmul" FFI target on CUDA: validates the operands with the
// checks every backend shares, then hands raw pointers to the launcher.
#include <cuda_runtime.h>

#include <string>

#include "common/marlin_shape.h"
#include "cuda/marlin_cuda_ffi.h"
#include "cuda/marlin_launch.h"

namespace ffi = xla::ffi;

namespace jax_marlin::cuda {
namespace {

ffi::Error MarlinMatmulCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> packed,
                                ffi::AnyBuffer scales, ffi::Result<ffi::AnyBuffer> y,
                                ffi::Result<ffi::Buffer<ffi::F32>> workspace,
                                ffi::Result<ffi::Buffer<ffi::S32>> locks) {
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
  if (workspace->element_count() < workspace_floats(m, n) || locks->element_count() < lock_count(m, n)) {
    return ffi::Error::InvalidArgument(
        "jax_marlin_matmul (CUDA): workspace needs " + std::to_string(workspace_floats(m, n)) +
        " floats and locks " + std::to_string(lock_count(m, n)) + " ints, got " +
        std::to_string(workspace->element_count()) + " and " + std::to_string(locks->element_count()));
  }

  MarlinProblem problem;
  problem.dtype = shape.dtype == ffi::DataType::BF16 ? ActDtype::kBFloat16 : ActDtype::kFloat16;
  problem.x = x.untyped_data();
  problem.packed = packed.typed_data();
  problem.scales = scales.untyped_data();
  problem.y = y->untyped_data();
  problem.workspace = workspace->typed_data();
  problem.locks = locks->typed_data();
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

}  // namespace
}  // namespace jax_marlin::cuda

// Command-buffer compatible: the handler only enqueues a memset and kernel
// launches on the given stream (no host sync, no allocation, no host reads of
// device data), so XLA may capture it into a CUDA graph.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MarlinMatmulCuda, jax_marlin::cuda::MarlinMatmulCudaImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::S32>>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::S32>>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
