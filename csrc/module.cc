// The Python extension jax_marlin._ext: hands the FFI handlers to Python as
// capsules, which jax_marlin/_ffi.py registers with jax.ffi.register_ffi_target.
// It only exports pointers; nothing here runs a kernel, so importing it needs
// neither a GPU nor a CUDA driver.
#include <nanobind/nanobind.h>

#include "common/marlin_layout.h"
#include "cpu/marlin_cpu.h"
#ifdef JAX_MARLIN_WITH_CUDA
#include "cuda/marlin_cuda_ffi.h"
#include "cuda/marlin_launch.h"
#include "cuda/prefill_launch.h"
#include "cuda/sparse_launch.h"
#endif

namespace nb = nanobind;

namespace {

constexpr const char* kTarget = "jax_marlin_matmul";
// 2:4 sparse weights (issue 8).
constexpr const char* kSparseTarget = "jax_marlin_sparse_matmul";
// The dense weight (CUDA only: the large-M dense path; the CPU needs none).
constexpr const char* kDequantizeTarget = "jax_marlin_dequantize";

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
  cpu[kSparseTarget] = Capsule(SparseMatmulCpu);
  out["cpu"] = cpu;
#ifdef JAX_MARLIN_WITH_CUDA
  // A stateful handler: one capsule per FFI execution stage.
  nb::dict stages;
  stages["instantiate"] = Capsule(MarlinMatmulCudaInstantiate);
  stages["execute"] = Capsule(MarlinMatmulCuda);
  nb::dict sparse_stages;
  sparse_stages["instantiate"] = Capsule(SparseMatmulCudaInstantiate);
  sparse_stages["execute"] = Capsule(SparseMatmulCuda);
  nb::dict cuda;
  cuda[kTarget] = stages;
  cuda[kSparseTarget] = sparse_stages;
  cuda[kDequantizeTarget] = Capsule(MarlinDequantizeCuda);
  out["CUDA"] = cuda;
#endif
  return out;
}

// platform -> {type name: {"type_id": capsule, "type_info": capsule}}: the
// FFI types the handlers' states use (jax.ffi.register_ffi_type).
nb::dict Types() {
  nb::dict out;
#ifdef JAX_MARLIN_WITH_CUDA
  nb::dict lock_buffer;
  lock_buffer["type_id"] = nb::capsule(static_cast<void*>(jax_marlin::cuda::lock_buffer_type_id()));
  lock_buffer["type_info"] = nb::capsule(
      const_cast<void*>(static_cast<const void*>(jax_marlin::cuda::lock_buffer_type_info())));
  nb::dict cuda;
  cuda["jax_marlin_lock_buffer"] = lock_buffer;
  out["CUDA"] = cuda;
#endif
  return out;
}

// Whether the layout's closed forms (device code) equal the FORMAT.md
// recipe's tables at every entry.
bool LayoutClosedFormsMatch() {
  using namespace jax_marlin;
  const auto dest = MarlinWeightUnpermute();
  for (int i = 0; i < kRunValues; ++i) {
    if (dest[i] != MarlinCodePosition(i / 8, i % 8)) return false;
  }
  const auto grouped = MarlinGroupedScaleInverse();
  for (int b = 0; b < 64; ++b) {
    if (grouped[b] != MarlinGroupedScaleSource(b)) return false;
  }
  const auto channel = MarlinPerChannelScaleInverse();
  for (int b = 0; b < 32; ++b) {
    if (channel[b] != MarlinPerChannelScaleSource(b)) return false;
  }
  return true;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "XLA FFI handlers of jax_marlin (use jax_marlin._ffi, not this module).";
  m.def("registrations", &Registrations,
        "Map platform ('cpu', 'CUDA') -> {target name: PyCapsule of the FFI handler, or a dict "
        "of them by execution stage}.");
  m.def("types", &Types,
        "Map platform -> {type name: {'type_id', 'type_info'}}: FFI types to register first.");
  m.def("layout_closed_forms_match", &LayoutClosedFormsMatch,
        "Whether the closed-form Marlin layout maps the CUDA dequantize uses equal the "
        "FORMAT.md recipe tables (marlin_layout.h).");
  m.def("has_cuda", []() {
#ifdef JAX_MARLIN_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA handler.");
#ifdef JAX_MARLIN_WITH_CUDA
  m.def("cuda_workspace_floats", [](int m_rows, int k, int n) {
    return jax_marlin::cuda::workspace_floats(m_rows, k, n);
  }, nb::arg("m"), nb::arg("k"), nb::arg("n"),
  "float32 workspace the CUDA handler needs for an (m, k) x (k, n) product.");
  m.def("cuda_sparse_workspace_floats", [](int m_rows, int k, int n) {
    return jax_marlin::cuda::sparse_workspace_floats(m_rows, k, n);
  }, nb::arg("m"), nb::arg("k"), nb::arg("n"),
  "float32 workspace the sparse CUDA handler needs for an (m, k) x (k, n) product.");
  m.def("cuda_prefill_shape", [](int m_rows, int k, int n, int group_size, int sms, bool sparse) -> nb::object {
    const auto shape = jax_marlin::cuda::prefill_shape_for(m_rows, k, n, group_size, sms, sparse);
    if (shape.variant < 0) return nb::none();
    const auto tile = jax_marlin::cuda::prefill_tile_size(shape.variant);
    nb::dict d;
    d["variant"] = shape.variant;
    d["splits"] = shape.splits;
    d["tile_rows"] = tile.rows;
    d["tile_cols"] = tile.cols;
    return d;
  }, nb::arg("m"), nb::arg("k"), nb::arg("n"), nb::arg("group_size"), nb::arg("sms"), nb::arg("sparse") = false,
  "The prefill kernel's tile variant and K split for an (m, k) x (k, n) product of dense (or, "
  "sparse=True, 2:4) weights on a Hopper GPU of `sms` SMs (a dict), or None where the chunks run it.");
  m.def("cuda_captured_calls", &jax_marlin::cuda::captured_call_count,
        "Executions of the CUDA handler so far that were captured into a CUDA graph.");
#endif
}
