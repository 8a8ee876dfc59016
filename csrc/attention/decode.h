// Attention decoding op of the turbolm extension: argument checks, the problem geometry and
// output allocation shared by the CPU (decode.cpp) and CUDA (decode.cu) implementations.
//
// Schema (defined in decode.cpp, `torch.ops.turbolm.attention_decode`):
//   attention_decode(q, k, v, scale, causal, window_left, window_right, num_splits)
//     -> (out, lse)
// q (B, Hq, Tq, D), k / v (B, Hkv, Tk, D), any strides with a unit stride on D (so a slice of
// a preallocated KV cache, or the transposed view of a (B, T, H, D) tensor, is read in place);
// Hq % Hkv == 0 (grouped-query heads share their k / v head). out is q's shape and dtype, laid
// out like q (empty_like); lse (B, Hq, Tq) float32 (float64 for float64 inputs) is the
// log-sum-exp of each row's scaled scores (-inf for a row that sees no key, whose output is 0).
// num_splits: how many chunks the keys are cut into (0 = chosen for the machine); the result
// does not depend on it beyond rounding. Inference only: there is no backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "../common/alloc.h"
#include "../common/checks.h"

namespace turbolm::attention {

// Sizes and element strides of one decode problem (strides of the (B, H, T, D) views).
struct DecodeGeometry {
  int64_t batch, q_heads, kv_heads, q_len, k_len, head_dim;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3];  // batch, head, seq
  double scale;
  bool causal;
  int64_t window_left, window_right;
};

inline void copy_strides(const at::Tensor& t, int64_t* dst) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

inline c10::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == c10::ScalarType::Double ? c10::ScalarType::Double
                                                     : c10::ScalarType::Float;
}

// Checks the arguments and returns the geometry (out's strides are filled in by the caller).
inline DecodeGeometry check_decode(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, double scale, bool causal,
                                   int64_t window_left, int64_t window_right,
                                   int64_t num_splits) {
  CHECK_FLOAT(q);
  CHECK_SAME_DTYPE(k, q);
  CHECK_SAME_DTYPE(v, q);
  CHECK_SAME_DEVICE(k, q);
  CHECK_SAME_DEVICE(v, q);
  CHECK_DIM(q, 4);
  CHECK_DIM(k, 4);
  CHECK_DIM(v, 4);
  const int64_t b = q.size(0), hq = q.size(1), tq = q.size(2), d = q.size(3);
  TURBOLM_CHECK(ShapeError, d > 0, "q must have a non-empty head_dim, got shape ",
                shape_str(q.sizes()));
  TURBOLM_CHECK(ShapeError, k.sizes() == v.sizes(), "k and v must have the same shape, got ",
                shape_str(k.sizes()), " and ", shape_str(v.sizes()));
  TURBOLM_CHECK(ShapeError, k.size(0) == b && k.size(3) == d,
                "k must be (batch=", b, ", kv_heads, seq_k, head_dim=", d, "), got ",
                shape_str(k.sizes()));
  const int64_t hkv = k.size(1);
  TURBOLM_CHECK(ShapeError, hkv > 0 && hq % hkv == 0, "q heads (", hq,
                ") must be a multiple of k/v heads (", hkv, ")");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TURBOLM_CHECK(InputError, t->size(3) <= 1 || t->stride(3) == 1,
                  (t == &q ? "q" : t == &k ? "k" : "v"),
                  " must have a unit stride on head_dim (the last dimension), got strides ",
                  shape_str(t->strides()));
  }
  TURBOLM_CHECK(InputError, std::isfinite(scale) && scale > 0,
                "scale must be a finite number > 0, got ", scale);
  TURBOLM_CHECK(InputError, window_left >= -1 && window_right >= -1,
                "window sizes must be >= 0 or -1 (unbounded), got (", window_left, ", ",
                window_right, ")");
  TURBOLM_CHECK(InputError, num_splits >= 0, "num_splits must be >= 0 (0 = auto), got ",
                num_splits);
  DecodeGeometry g{};
  g.batch = b;
  g.q_heads = hq;
  g.kv_heads = hkv;
  g.q_len = tq;
  g.k_len = k.size(2);
  g.head_dim = d;
  copy_strides(q, g.q_stride);
  copy_strides(k, g.k_stride);
  copy_strides(v, g.v_stride);
  g.scale = scale;
  g.causal = causal;
  g.window_left = window_left;
  g.window_right = window_right;
  return g;
}

// out (empty_like(q): q's layout when q is dense) and lse (B, Hq, Tq).
inline std::tuple<at::Tensor, at::Tensor> new_decode_outputs(const at::Tensor& q,
                                                             DecodeGeometry& g) {
  at::Tensor out = at::empty_like(q);
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  copy_strides(out, g.out_stride);
  at::Tensor lse = new_output({g.batch, g.q_heads, g.q_len}, q.options().dtype(lse_dtype(q)));
  return {out, lse};
}

}  // namespace turbolm::attention
