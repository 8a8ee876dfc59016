// dtype dispatch for the float kernels: runs the lambda with `scalar_t` (the storage type)
// and `acc_t` (the accumulation type: float, or double for double inputs) defined.
//
//   TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] { kernel<scalar_t, acc_t>(...); });
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "checks.h"

#define TURBOLM_DISPATCH_CASE(ENUM, SCALAR, ACC, ...) \
  case c10::ScalarType::ENUM: {                       \
    using scalar_t = SCALAR;                          \
    using acc_t = ACC;                                \
    return __VA_ARGS__();                             \
  }

#define TURBOLM_DISPATCH_FLOAT(TYPE, OP_NAME, ...)                                          \
  [&] {                                                                                     \
    const c10::ScalarType _turbolm_t = (TYPE);                                              \
    switch (_turbolm_t) {                                                                   \
      TURBOLM_DISPATCH_CASE(Float, float, float, __VA_ARGS__)                               \
      TURBOLM_DISPATCH_CASE(Double, double, double, __VA_ARGS__)                            \
      TURBOLM_DISPATCH_CASE(Half, c10::Half, float, __VA_ARGS__)                            \
      TURBOLM_DISPATCH_CASE(BFloat16, c10::BFloat16, float, __VA_ARGS__)                    \
      default:                                                                              \
        TORCH_CHECK(false, "[turbolm.DTypeError] ", OP_NAME,                                \
                    ": dtype must be one of (float16, bfloat16, float32, float64), got ",   \
                    ::turbolm::dtype_str(_turbolm_t));                                      \
    }                                                                                       \
  }()
