// Input checks for the C++/CUDA ops: one-line, precise errors that name the argument.
//
// Every message starts with a tag "[turbolm.<ErrorClass>]" naming the class of
// turbolm.errors that the Python side raises for it (turbolm/ext.py maps them), e.g.
//
//   [turbolm.ShapeError] turbolm::layer_norm_fwd: weight must have shape (64,), got (32,)
//
// The checks are macros so that the failing expression's argument name comes for free.
// They expect a `const char* op` naming the op to be in scope (see TURBOLM_OP).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

namespace turbolm {

// Python spelling of a shape: (2, 3) / (7,) / ().
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// Python spelling of a dtype: float32, bfloat16, int64...
inline std::string dtype_str(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Half: return "float16";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Long: return "int64";
    case c10::ScalarType::Int: return "int32";
    case c10::ScalarType::Short: return "int16";
    case c10::ScalarType::Char: return "int8";
    case c10::ScalarType::Byte: return "uint8";
    case c10::ScalarType::Bool: return "bool";
    default: return c10::toString(t);
  }
}

inline bool is_float_type(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Double ||
         t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

}  // namespace turbolm

// Names the op in every message of the checks below: `TURBOLM_OP("turbolm::layer_norm_fwd");`
#define TURBOLM_OP(name) const char* op = name

// Fails with the given turbolm.errors class (InputError, DTypeError, ShapeError, DeviceError).
#define TURBOLM_CHECK(kind, cond, ...) \
  TORCH_CHECK((cond), "[turbolm." #kind "] ", op, ": ", __VA_ARGS__)

#define CHECK_FLOAT(t)                                                                   \
  TURBOLM_CHECK(DTypeError, ::turbolm::is_float_type((t).scalar_type()),               \
                #t " must have dtype in (float16, bfloat16, float32, float64), got ",  \
                ::turbolm::dtype_str((t).scalar_type()))

#define CHECK_DTYPE(t, dtype)                                                                \
  TURBOLM_CHECK(DTypeError, (t).scalar_type() == (dtype), #t " must have dtype ",           \
                ::turbolm::dtype_str(dtype), ", got ", ::turbolm::dtype_str((t).scalar_type()))

#define CHECK_SAME_DTYPE(t, ref)                                                              \
  TURBOLM_CHECK(DTypeError, (t).scalar_type() == (ref).scalar_type(),                        \
                #t " must have the dtype of " #ref " (", ::turbolm::dtype_str((ref).scalar_type()), \
                "), got ", ::turbolm::dtype_str((t).scalar_type()))

#define CHECK_CPU(t) \
  TURBOLM_CHECK(DeviceError, (t).device().is_cpu(), #t " must be a CPU tensor, got one on ", (t).device())

#define CHECK_CUDA(t) \
  TURBOLM_CHECK(DeviceError, (t).device().is_cuda(), #t " must be a CUDA tensor, got one on ", (t).device())

#define CHECK_SAME_DEVICE(t, ref)                                                            \
  TURBOLM_CHECK(DeviceError, (t).device() == (ref).device(), #t " must be on " #ref "'s device (", \
                (ref).device(), "), got ", (t).device())

#define CHECK_DIM(t, n)                                                                       \
  TURBOLM_CHECK(ShapeError, (t).dim() == (n), #t " must have ", (n), " dimensions, got shape ", \
                ::turbolm::shape_str((t).sizes()))

// CHECK_SHAPE(weight, n) / CHECK_SHAPE(x, rows, n): exact shape.
#define CHECK_SHAPE(t, ...)                                                                  \
  TURBOLM_CHECK(ShapeError, (t).sizes() == c10::IntArrayRef(std::vector<int64_t>{__VA_ARGS__}), \
                #t " must have shape ",                                                      \
                ::turbolm::shape_str(std::vector<int64_t>{__VA_ARGS__}), ", got ",           \
                ::turbolm::shape_str((t).sizes()))

#define CHECK_CONTIGUOUS(t) \
  TURBOLM_CHECK(InputError, (t).is_contiguous(), #t " must be contiguous")
