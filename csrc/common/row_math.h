// Per-element and per-row math of the normalization ops, shared by the CPU kernels
// (csrc/norm/norm.cpp) and the CUDA kernels (csrc/norm/norm.cu). Everything here is
// __host__ __device__ so that the CPU build, which CI runs, exercises the same formulas
// the GPU runs.
//
// Statistics use fp32 accumulation (fp64 for fp64 data) and are two-pass (mean, then the
// mean of squared deviations), so they stay exact for constant rows and accurate for data
// with a large offset (x = 1e4 + noise), where the one-pass E[x^2] - E[x]^2 would cancel
// catastrophically. The CPU walks a row twice (it is in cache); the GPU reads each chunk of
// a row once into registers, computes the chunk's mean and M2 two-pass there (moments_of)
// and merges chunks, lanes and warps with Chan et al.'s formula (moments_merge) in a fixed
// order. Every reduction order is fixed, so results are deterministic.
//
// Forward (per row, N values):      mean = sum(x) / N          (0 for RMSNorm)
//                                   rstd = 1 / sqrt(M2 / N + eps)   (sum(x^2) / N for RMSNorm)
//                                   xhat = (x - mean) * rstd;  y = xhat * w + b
// Backward (g = dy * w):            dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//                                   (RMSNorm: the mean(g) term is absent)
//                                   dw = sum over rows of dy * xhat;  db = sum over rows of dy
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TURBOLM_HD __host__ __device__ __forceinline__
#else
#define TURBOLM_HD inline
#endif

namespace turbolm {

// 1 / sqrt(v). The device versions use the hardware reciprocal square root.
TURBOLM_HD float rsqrt_acc(float v) {
#ifdef __CUDA_ARCH__
  return ::rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

TURBOLM_HD double rsqrt_acc(double v) {
#ifdef __CUDA_ARCH__
  return ::rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// Count, mean and M2 (sum of squared deviations from the mean) of a set of values.
template <typename acc_t>
struct Moments {
  acc_t n;
  acc_t mean;
  acc_t m2;
};

// Moments of `count` values held in registers: two-pass, exact for constant data.
template <typename acc_t>
TURBOLM_HD Moments<acc_t> moments_of(const acc_t* v, int count) {
  acc_t sum = 0;
  for (int i = 0; i < count; ++i) sum += v[i];
  const acc_t mean = sum / static_cast<acc_t>(count);
  acc_t m2 = 0;
  for (int i = 0; i < count; ++i) {
    const acc_t d = v[i] - mean;
    m2 += d * d;
  }
  return {static_cast<acc_t>(count), mean, m2};
}

// Chan et al.'s combination of the moments of two disjoint sets (a before b).
template <typename acc_t>
TURBOLM_HD Moments<acc_t> moments_merge(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const acc_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t frac = b.n / n;
  return {n, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.n * frac};
}

// Sums of a row's backward: sum(g) and sum(g * xhat).
template <typename acc_t>
struct GradSums {
  acc_t g;
  acc_t gx;
};

template <typename acc_t>
TURBOLM_HD GradSums<acc_t> grad_sums_merge(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return {a.g + b.g, a.gx + b.gx};
}

// ---- per-element formulas -------------------------------------------------------------

// y = (x - mean) * rstd * w + b; RMSNorm passes mean = 0 and b = 0.
template <typename acc_t>
TURBOLM_HD acc_t norm_apply(acc_t x, acc_t mean, acc_t rstd, acc_t w, acc_t b) {
  return (x - mean) * rstd * w + b;
}

// dx of one element given the row's mean(g) and mean(g * xhat) (mean_g = 0 for RMSNorm).
template <typename acc_t>
TURBOLM_HD acc_t norm_dx(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_g, acc_t mean_gx) {
  return (g - (mean_g + xhat * mean_gx)) * rstd;
}

// ---- per-row routines (serial over one row; the CPU kernels call these) -----------------
//
// Sums run in kLanes independent accumulators (lane j takes elements j, j + kLanes, ...),
// added pairwise at the end: the compiler vectorizes the lanes without reassociating
// anything, the rounding error grows like N / kLanes instead of N, and the result does not
// depend on how rows are split among threads.

constexpr int kLanes = 16;

// Pairwise, fixed-order sum of the kLanes accumulators (clobbers them).
template <typename acc_t>
TURBOLM_HD acc_t lanes_sum(acc_t* lanes) {
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

// LayerNorm statistics of row x[0..n): two passes, mean then mean of squared deviations
// (exact for constant rows; no cancellation for large offsets).
template <typename T, typename acc_t>
TURBOLM_HD void layer_norm_row_stats(const T* x, int64_t n, acc_t eps, acc_t* mean, acc_t* rstd) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(x[i + j]);
  for (int j = 0; i + j < n; ++j) lanes[j] += static_cast<acc_t>(x[i + j]);
  const acc_t mu = lanes_sum(lanes) / static_cast<acc_t>(n);
  for (int j = 0; j < kLanes; ++j) lanes[j] = 0;
  for (i = 0; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(x[i + j]) - mu;
      lanes[j] += d * d;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const acc_t d = static_cast<acc_t>(x[i + j]) - mu;
    lanes[j] += d * d;
  }
  *mean = mu;
  *rstd = rsqrt_acc(lanes_sum(lanes) / static_cast<acc_t>(n) + eps);
}

// RMSNorm: rstd = 1 / sqrt(mean(x^2) + eps) of row x[0..n).
template <typename T, typename acc_t>
TURBOLM_HD void rms_norm_row_stats(const T* x, int64_t n, acc_t eps, acc_t* rstd) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      lanes[j] += v * v;
    }
  }
  for (int j = 0; i + j < n; ++j) {
    const acc_t v = static_cast<acc_t>(x[i + j]);
    lanes[j] += v * v;
  }
  *rstd = rsqrt_acc(lanes_sum(lanes) / static_cast<acc_t>(n) + eps);
}

// Normalizes one row: y = norm_apply(x, mean, rstd, w, b) (w = 1 / b = 0 when absent).
// x / y are of storage type T (or acc_t buffers); w / b of type P.
template <bool HAS_W, bool HAS_B, typename T, typename acc_t, typename P>
TURBOLM_HD void norm_row_apply(const T* x, const P* w, const P* b, T* y, int64_t n, acc_t mean,
                               acc_t rstd) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t wi = HAS_W ? static_cast<acc_t>(w[i]) : acc_t(1);
    const acc_t bi = HAS_B ? static_cast<acc_t>(b[i]) : acc_t(0);
    y[i] = static_cast<T>(norm_apply(static_cast<acc_t>(x[i]), mean, rstd, wi, bi));
  }
}

// One element of the backward's first pass: lane sums of g and g * xhat, and this row's
// contribution to the caller's dweight / dbias partial sums.
template <bool HAS_W, bool ACC_W, bool ACC_B, typename T, typename acc_t, typename P>
TURBOLM_HD void norm_bwd_accumulate(const T* dy, const T* x, const P* w, int64_t i, acc_t mean,
                                    acc_t rstd, acc_t& lane_g, acc_t& lane_gx, acc_t* dw_acc,
                                    acc_t* db_acc) {
  const acc_t d = static_cast<acc_t>(dy[i]);
  const acc_t g = HAS_W ? d * static_cast<acc_t>(w[i]) : d;
  const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
  lane_g += g;
  lane_gx += g * xhat;
  if (ACC_W) dw_acc[i] += d * xhat;
  if (ACC_B) db_acc[i] += d;
}

// Backward of one row: writes dx[0..n) and adds this row's dy * xhat / dy into dw_acc /
// db_acc (the caller's partial sums over its rows) when ACC_W / ACC_B.
template <bool HAS_W, bool ACC_W, bool ACC_B, typename T, typename acc_t, typename P>
TURBOLM_HD void norm_row_backward(const T* dy, const T* x, const P* w, T* dx, int64_t n,
                                  acc_t mean, acc_t rstd, bool rms, acc_t* dw_acc,
                                  acc_t* db_acc) {
  acc_t lane_g[kLanes] = {}, lane_gx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j)
      norm_bwd_accumulate<HAS_W, ACC_W, ACC_B>(dy, x, w, i + j, mean, rstd, lane_g[j],
                                               lane_gx[j], dw_acc, db_acc);
  for (int j = 0; i + j < n; ++j)
    norm_bwd_accumulate<HAS_W, ACC_W, ACC_B>(dy, x, w, i + j, mean, rstd, lane_g[j], lane_gx[j],
                                             dw_acc, db_acc);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t mean_g = rms ? acc_t(0) : lanes_sum(lane_g) * inv_n;
  const acc_t mean_gx = lanes_sum(lane_gx) * inv_n;
  for (i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(dy[i]);
    const acc_t g = HAS_W ? d * static_cast<acc_t>(w[i]) : d;
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean) * rstd;
    dx[i] = static_cast<T>(norm_dx(g, xhat, rstd, mean_g, mean_gx));
  }
}

}  // namespace turbolm
