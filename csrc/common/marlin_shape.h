// Operand checks for the "jax_marlin_matmul" FFI target, shared by every
// backend so that all of them accept and reject exactly the same problems
// with the same messages (CONTRACT.md, "FFI target").
//
// Header-only; needs only the XLA FFI headers (works under nvcc too).
#ifndef JAX_MARLIN_COMMON_MARLIN_SHAPE_H_
#define JAX_MARLIN_COMMON_MARLIN_SHAPE_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_marlin {

// Tile sizes fixed by the Marlin layout (FORMAT.md): packed weights come in
// bands of 16 rows, one permutation run covers 64 output columns, and the
// kernel wants K in whole 64-row steps.
inline constexpr int64_t kBandRows = 16;
inline constexpr int64_t kChunkCols = 64;
inline constexpr int64_t kKMultiple = 64;
// The 2:4 sparse layout's bands (docs/SPARSE_FORMAT.md): one mma.sp k of 32 rows.
inline constexpr int64_t kSparseBandRowsShape = 32;

// The sizes of one matmul problem, read off validated operands.
struct MarlinShape {
  int64_t m = 0;           // rows of x (leading dims already folded by Python)
  int64_t k = 0;           // reduction size
  int64_t n = 0;           // output columns
  int64_t groups = 0;      // rows of scales, G
  int64_t group_size = 0;  // K / G
  bool per_channel = false;  // G == 1: per-channel scale permutation
  xla::ffi::DataType dtype = xla::ffi::DataType::F16;  // of x, scales and y
};

namespace shape_internal {

inline std::string Dims(xla::ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

// invalid(what): an InvalidArgument error that names the FFI target.
inline auto InvalidFor(const char* target) {
  return [target](const std::string& what) {
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": " + what);
  };
}

inline xla::ffi::Error Invalid(const std::string& what) { return InvalidFor("jax_marlin_matmul")(what); }

}  // namespace shape_internal

// Checks shared by every target: dtypes of x, scales and y, x (M, K) with K a
// positive multiple of 64, scales (G, N) with N a positive multiple of 64 and
// a supported group size, y (M, N). Fills *shape. `target` prefixes messages.
inline xla::ffi::Error CheckActivationsAndScales(
    const char* target, xla::ffi::DataType x_type, xla::ffi::Span<const int64_t> x_dims,
    xla::ffi::DataType scales_type, xla::ffi::Span<const int64_t> scales_dims,
    xla::ffi::DataType y_type, xla::ffi::Span<const int64_t> y_dims, MarlinShape* shape) {
  using shape_internal::Dims;
  using xla::ffi::DataType;
  const auto invalid = shape_internal::InvalidFor(target);

  if (x_type != DataType::F16 && x_type != DataType::BF16) {
    return invalid("x must be float16 or bfloat16");
  }
  if (scales_type != x_type) return invalid("scales must have the same dtype as x");
  if (y_type != x_type) return invalid("the result must have the same dtype as x");
  if (x_dims.size() != 2) return invalid("x must have rank 2 (M, K), got " + Dims(x_dims));
  if (scales_dims.size() != 2) {
    return invalid("scales must have rank 2 (G, N), got " + Dims(scales_dims));
  }
  const int64_t m = x_dims[0], k = x_dims[1];
  const int64_t n = scales_dims[1], groups = scales_dims[0];
  if (k <= 0 || k % kKMultiple != 0) {
    return invalid("K = " + std::to_string(k) + " must be a positive multiple of 64");
  }
  if (n <= 0 || n % kChunkCols != 0) {
    return invalid("N = " + std::to_string(n) + " must be a positive multiple of 64");
  }
  if (groups <= 0 || k % groups != 0) {
    return invalid("scales have " + std::to_string(groups) + " rows, which must divide K = " +
                   std::to_string(k));
  }
  const int64_t group_size = k / groups;
  const bool per_channel = groups == 1;
  if (!per_channel && group_size != 32 && group_size != 64 && group_size != 128) {
    return invalid("group size K/G = " + std::to_string(group_size) +
                   " is unsupported; use 32, 64, 128 or per-channel (G == 1)");
  }
  if (y_dims.size() != 2 || y_dims[0] != m || y_dims[1] != n) {
    return invalid("the result has shape " + Dims(y_dims) + ", expected (M, N) = (" +
                   std::to_string(m) + ", " + std::to_string(n) + ")");
  }
  shape->m = m;
  shape->k = k;
  shape->n = n;
  shape->groups = groups;
  shape->group_size = group_size;
  shape->per_channel = per_channel;
  shape->dtype = x_type;
  return xla::ffi::Error::Success();
}

// Checks x (M, K), packed (K/16, 2N) int32, scales (G, N) and the result
// y (M, N) against the contract; fills *shape on success.
inline xla::ffi::Error CheckMarlinOperands(
    xla::ffi::DataType x_type, xla::ffi::Span<const int64_t> x_dims,
    xla::ffi::DataType packed_type, xla::ffi::Span<const int64_t> packed_dims,
    xla::ffi::DataType scales_type, xla::ffi::Span<const int64_t> scales_dims,
    xla::ffi::DataType y_type, xla::ffi::Span<const int64_t> y_dims, MarlinShape* shape) {
  using shape_internal::Dims;
  using shape_internal::Invalid;
  xla::ffi::Error status = CheckActivationsAndScales(
      "jax_marlin_matmul", x_type, x_dims, scales_type, scales_dims, y_type, y_dims, shape);
  if (status.failure()) return status;
  if (packed_type != xla::ffi::DataType::S32) return Invalid("packed weights must be int32");
  const int64_t k = shape->k, n = shape->n;
  if (packed_dims.size() != 2 || packed_dims[0] != k / kBandRows || packed_dims[1] != 2 * n) {
    return Invalid("packed weights have shape " + Dims(packed_dims) + ", expected (K/16, 2N) = (" +
                   std::to_string(k / kBandRows) + ", " + std::to_string(2 * n) + ")");
  }
  return xla::ffi::Error::Success();
}

// The "jax_marlin_dequantize" target (CUDA): packed (K/16, 2N) int32,
// scales (G, N) float16 / bfloat16, the result w (K, N) in the scales' dtype.
// Fills *shape with M = K (w has K rows).
inline xla::ffi::Error CheckDequantizeOperands(
    xla::ffi::DataType packed_type, xla::ffi::Span<const int64_t> packed_dims,
    xla::ffi::DataType scales_type, xla::ffi::Span<const int64_t> scales_dims,
    xla::ffi::DataType w_type, xla::ffi::Span<const int64_t> w_dims, MarlinShape* shape) {
  using shape_internal::Dims;
  constexpr const char* kTarget = "jax_marlin_dequantize";
  const auto invalid = shape_internal::InvalidFor(kTarget);
  if (packed_type != xla::ffi::DataType::S32) return invalid("packed weights must be int32");
  if (packed_dims.size() != 2) {
    return invalid("packed weights must have rank 2 (K/16, 2N), got " + Dims(packed_dims));
  }
  if (scales_type != xla::ffi::DataType::F16 && scales_type != xla::ffi::DataType::BF16) {
    return invalid("scales must be float16 or bfloat16");
  }
  // w is checked as the (M, N) result of an (M, K) operand with M = K.
  const int64_t k = packed_dims[0] * kBandRows;
  const int64_t kk[2] = {k, k};
  xla::ffi::Error status = CheckActivationsAndScales(
      kTarget, scales_type, xla::ffi::Span<const int64_t>(kk, 2), scales_type, scales_dims, w_type,
      w_dims, shape);
  if (status.failure()) return status;
  if (packed_dims[1] != 2 * shape->n) {
    return invalid("packed weights have shape " + Dims(packed_dims) + ", expected (K/16, 2N) = (" +
                   std::to_string(packed_dims[0]) + ", " + std::to_string(2 * shape->n) + ")");
  }
  return xla::ffi::Error::Success();
}

// The 2:4 sparse target: x (M, K), values (K/32, 2N) int32, meta (K/32, N)
// int32, scales (G, N), y (M, N).
inline xla::ffi::Error CheckSparseOperands(
    xla::ffi::DataType x_type, xla::ffi::Span<const int64_t> x_dims,
    xla::ffi::DataType values_type, xla::ffi::Span<const int64_t> values_dims,
    xla::ffi::DataType meta_type, xla::ffi::Span<const int64_t> meta_dims,
    xla::ffi::DataType scales_type, xla::ffi::Span<const int64_t> scales_dims,
    xla::ffi::DataType y_type, xla::ffi::Span<const int64_t> y_dims, MarlinShape* shape) {
  using shape_internal::Dims;
  constexpr const char* kTarget = "jax_marlin_sparse_matmul";
  const auto invalid = shape_internal::InvalidFor(kTarget);
  xla::ffi::Error status = CheckActivationsAndScales(
      kTarget, x_type, x_dims, scales_type, scales_dims, y_type, y_dims, shape);
  if (status.failure()) return status;
  if (values_type != xla::ffi::DataType::S32 || meta_type != xla::ffi::DataType::S32) {
    return invalid("values and meta must be int32");
  }
  const int64_t bands = shape->k / kSparseBandRowsShape, n = shape->n;
  if (values_dims.size() != 2 || values_dims[0] != bands || values_dims[1] != 2 * n) {
    return invalid("values have shape " + Dims(values_dims) + ", expected (K/32, 2N) = (" +
                   std::to_string(bands) + ", " + std::to_string(2 * n) + ")");
  }
  if (meta_dims.size() != 2 || meta_dims[0] != bands || meta_dims[1] != n) {
    return invalid("meta has shape " + Dims(meta_dims) + ", expected (K/32, N) = (" +
                   std::to_string(bands) + ", " + std::to_string(n) + ")");
  }
  return xla::ffi::Error::Success();
}

}  // namespace jax_marlin

#endif  // JAX_MARLIN_COMMON_MARLIN_SHAPE_H_
