// LayerNorm / RMSNorm ops of the turbolm extension: argument checks and output allocation
// shared by the CPU (norm.cpp) and CUDA (norm.cu) implementations.
//
// Schemas (defined in norm.cpp, `torch.ops.turbolm.*`), x is (rows, N):
//   layer_norm_fwd(x, weight?, bias?, eps)            -> (y, mean, rstd)
//   layer_norm_bwd(dy, x, weight?, mean, rstd, has_bias) -> (dx, dweight, dbias)
//   rms_norm_fwd(x, weight?, eps)                     -> (y, rstd)
//   rms_norm_bwd(dy, x, weight?, rstd)                -> (dx, dweight)
// mean / rstd are (rows,) float32 (float64 for float64 x). dweight is (N,) in weight's dtype
// when weight is given, else (0,); dbias is (N,) when has_bias, else (0,).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "../common/alloc.h"
#include "../common/checks.h"

namespace turbolm::norm {

inline c10::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == c10::ScalarType::Double ? c10::ScalarType::Double
                                                     : c10::ScalarType::Float;
}

// Forward checks: x is a (rows, N) float tensor; weight / bias are (N,) of x's dtype and device.
inline void check_fwd(const char* op, const at::Tensor& x,
                      const std::optional<at::Tensor>& weight_opt,
                      const std::optional<at::Tensor>& bias_opt, double eps) {
  CHECK_FLOAT(x);
  CHECK_DIM(x, 2);
  const int64_t n = x.size(1);
  TURBOLM_CHECK(ShapeError, n > 0, "x must have a non-empty last dimension, got shape ",
                shape_str(x.sizes()));
  if (weight_opt) {
    const at::Tensor& weight = *weight_opt;
    CHECK_SAME_DTYPE(weight, x);
    CHECK_SAME_DEVICE(weight, x);
    CHECK_SHAPE(weight, n);
  }
  if (bias_opt) {
    const at::Tensor& bias = *bias_opt;
    CHECK_SAME_DTYPE(bias, x);
    CHECK_SAME_DEVICE(bias, x);
    CHECK_SHAPE(bias, n);
  }
  TURBOLM_CHECK(InputError, eps >= 0 && std::isfinite(eps), "eps must be a finite number >= 0, got ",
                eps);
}

// Backward checks: dy like x; saved statistics (rows,) in the statistics dtype.
inline void check_bwd(const char* op, const at::Tensor& dy, const at::Tensor& x,
                      const std::optional<at::Tensor>& weight, const at::Tensor* mean_ptr,
                      const at::Tensor& rstd) {
  check_fwd(op, x, weight, std::nullopt, 0.0);
  const int64_t rows = x.size(0), n = x.size(1);
  CHECK_SAME_DTYPE(dy, x);
  CHECK_SAME_DEVICE(dy, x);
  CHECK_SHAPE(dy, rows, n);
  if (mean_ptr) {
    const at::Tensor& mean = *mean_ptr;
    CHECK_DTYPE(mean, stat_dtype(x));
    CHECK_SAME_DEVICE(mean, x);
    CHECK_SHAPE(mean, rows);
  }
  CHECK_DTYPE(rstd, stat_dtype(x));
  CHECK_SAME_DEVICE(rstd, x);
  CHECK_SHAPE(rstd, rows);
}

inline void check_on_cpu(const char* op, const at::Tensor& x) { CHECK_CPU(x); }
inline void check_on_cuda(const char* op, const at::Tensor& x) { CHECK_CUDA(x); }

// Contiguous version of an optional tensor (or an undefined tensor when absent).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace turbolm::norm
