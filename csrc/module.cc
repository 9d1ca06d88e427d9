// The Python extension jax_marlin._ext: hands the FFI handlers to Python as
// capsules, which jax_marlin/_ffi.py registers with jax.ffi.register_ffi_target.
// It only exports pointers; nothing here runs a kernel, so importing it needs
// neither a GPU nor a CUDA driver.
#include <nanobind/nanobind.h>

#include "cpu/marlin_cpu.h"
#ifdef JAX_MARLIN_WITH_CUDA
#include "cuda/marlin_cuda_ffi.h"
#include "cuda/marlin_launch.h"
#endif

namespace nb = nanobind;

namespace {

constexpr const char* kTarget = "jax_marlin_matmul";

// XLA expects a PyCapsule holding the handler's address (no name).
template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// platform name as jax.ffi.register_ffi_target spells it -> {target: capsule}
nb::dict Registrations() {
  nb::dict out;
  nb::dict cpu;
  cpu[kTarget] = Capsule(MarlinMatmulCpu);
  out["cpu"] = cpu;
#ifdef JAX_MARLIN_WITH_CUDA
  nb::dict cuda;
  cuda[kTarget] = Capsule(MarlinMatmulCuda);
  out["CUDA"] = cuda;
#endif
  return out;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "XLA FFI handlers of jax_marlin (use jax_marlin._ffi, not this module).";
  m.def("registrations", &Registrations,
        "Map platform ('cpu', 'CUDA') -> {target name: PyCapsule of the FFI handler}.");
  m.def("has_cuda", []() {
#ifdef JAX_MARLIN_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA handler.");
#ifdef JAX_MARLIN_WITH_CUDA
  m.def("cuda_scratch_sizes", [](int m_rows, int n) {
    return nb::make_tuple(jax_marlin::cuda::workspace_floats(m_rows, n),
                          jax_marlin::cuda::lock_count(m_rows, n));
  }, nb::arg("m"), nb::arg("n"),
  "(workspace float32 count, lock int32 count) the CUDA handler needs for an (m, n) output.");
#endif
}
