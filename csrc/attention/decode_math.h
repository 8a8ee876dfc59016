// Attention decoding math shared by the CPU kernel (decode.cpp) and the CUDA kernels
// (decode.cu): which keys a query sees, and how the partial results of key splits merge.
//
// Decoding attends Tq new queries (usually 1) to a cache of Tk keys. The keys are cut into
// `splits` contiguous chunks; each chunk yields, per query row, the running max of the scaled
// scores m, the sum of exp(score - m) l, and the unnormalized output acc = sum exp(score - m) v
// (or the normalized o = acc / l with lse = m + log l). Chunks merge exactly:
//   M = max_s lse_s;  w_s = exp(lse_s - M);  out = sum_s w_s o_s / sum_s w_s;
//   lse = M + log(sum_s w_s).
// A query row that sees no key (empty window) outputs zeros with lse = -inf, as the
// attention op's other backends do.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TURBOLM_HD __host__ __device__ __forceinline__
#else
#define TURBOLM_HD inline
#endif

namespace turbolm::attention {

// Keys [lo, hi) visible to query t of tq, against tk keys. Causal is bottom-right aligned
// (query t sits at key position t + tk - tq); window_left / window_right (-1 = unbounded)
// bound the keys around that position, FlashAttention's window_size semantics.
struct KeyRange {
  int64_t lo;
  int64_t hi;
};

TURBOLM_HD KeyRange visible_keys(int64_t t, int64_t tq, int64_t tk, bool causal,
                                 int64_t window_left, int64_t window_right) {
  const int64_t diag = t + tk - tq;
  int64_t hi = tk;
  if (causal && diag + 1 < hi) hi = diag + 1;
  if (window_right >= 0 && diag + window_right + 1 < hi) hi = diag + window_right + 1;
  int64_t lo = 0;
  if (window_left >= 0 && diag - window_left > lo) lo = diag - window_left;
  if (hi < lo) hi = lo;
  return {lo, hi};
}

// Keys of split s when tk keys are cut in chunks of `chunk` keys: [s * chunk, (s + 1) * chunk)
// clipped to tk (the last chunk may be shorter, a split past the end is empty).
TURBOLM_HD KeyRange chunk_keys(int64_t s, int64_t tk, int64_t chunk) {
  const int64_t lo = s * chunk < tk ? s * chunk : tk;
  const int64_t hi = lo + chunk < tk ? lo + chunk : tk;
  return {lo, hi};
}

// Keys of split s when tk keys are cut in `splits` chunks of ceil(tk / splits).
TURBOLM_HD int64_t split_chunk(int64_t tk, int64_t splits) { return (tk + splits - 1) / splits; }

TURBOLM_HD KeyRange split_keys(int64_t s, int64_t tk, int64_t splits) {
  return chunk_keys(s, tk, split_chunk(tk, splits));
}

TURBOLM_HD KeyRange intersect(KeyRange a, KeyRange b) {
  const int64_t lo = a.lo > b.lo ? a.lo : b.lo;
  const int64_t hi = a.hi < b.hi ? a.hi : b.hi;
  return {lo, hi > lo ? hi : lo};
}

TURBOLM_HD float exp_acc(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  return std::exp(x);
#endif
}
TURBOLM_HD double exp_acc(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
TURBOLM_HD float log_acc(float x) {
#ifdef __CUDA_ARCH__
  return ::logf(x);
#else
  return std::log(x);
#endif
}
TURBOLM_HD double log_acc(double x) {
#ifdef __CUDA_ARCH__
  return ::log(x);
#else
  return std::log(x);
#endif
}

// log-sum-exp of a chunk from its running max and sum (-inf for a chunk without keys).
template <typename acc_t>
TURBOLM_HD acc_t chunk_lse(acc_t m, acc_t l) {
  return l > acc_t(0) ? m + log_acc(l) : acc_t(-INFINITY);
}

// Weight exp(lse - max_lse) of one chunk in the merge (0 for an empty chunk).
template <typename acc_t>
TURBOLM_HD acc_t merge_weight(acc_t lse, acc_t max_lse) {
  return lse == acc_t(-INFINITY) ? acc_t(0) : exp_acc(lse - max_lse);
}

}  // namespace turbolm::attention
