// Attention decoding: the op schema (torch.ops.turbolm.attention_decode) and the CPU kernel.
//
// CPU design (the CUDA kernels in decode.cu follow the same plan): the keys are cut into
// `splits` chunks (decode_math.h); one task per (batch, kv head, chunk) runs over
// at::parallel_for. A task handles every query row that reads its kv head (the GQA group of
// q heads x the Tq new tokens), so each key and value row is loaded and converted once per
// task, not once per q head:
//   1. scores s[r][j] = scale * q_r . k_j for the chunk's keys (-inf where not visible),
//   2. per row: m = max s, p = exp(s - m), l = sum p,
//   3. acc_r = sum_j p[r][j] v_j.
// With one chunk the rows are normalized and written directly; otherwise the chunks'
// (lse, acc / l) go to buffers in the accumulation type and a second parallel pass merges them exactly.
// Accumulation is fp32 (fp64 for fp64 data); 16-bit rows are converted to fp32 once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/dispatch.h"
#include "decode.h"
#include "decode_math.h"

namespace turbolm::attention {
namespace {

// Keys per chunk below which splitting further costs more (merge, scheduling) than it gains.
constexpr int64_t kMinKeysPerSplit = 256;

int64_t cpu_splits(const DecodeGeometry& g, int64_t requested) {
  if (g.k_len == 0) return 1;
  if (requested > 0) return std::min(requested, g.k_len);
  const int64_t tasks = g.batch * g.kv_heads;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (2 * threads + tasks - 1) / tasks;  // about two tasks per thread
  const int64_t most = std::max<int64_t>(1, g.k_len / kMinKeysPerSplit);
  return std::max<int64_t>(1, std::min(want, most));
}

template <typename scalar_t, typename acc_t>
void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// A row in the accumulation type: the row itself when it already is (fp32 / fp64 data), else
// its conversion into `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    load_row(src, buf, n);
    return buf;
  }
}

// a . b with kLanes independent partial sums: a plain `sum += a[i] * b[i]` is one serial
// chain that the compiler may not reorder (no -ffast-math), so it would not vectorize. The
// summation order is still fixed, so results are deterministic.
template <typename acc_t>
acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  constexpr int kLanes = 64 / sizeof(acc_t);  // two 256-bit registers of partial sums
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  acc_t sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// out += p * row
template <typename acc_t>
void axpy(acc_t p, const acc_t* __restrict row, acc_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += p * row[i];
}

// Per-task scratch, reused across the tasks one thread runs.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q;       // (rows, D) scaled queries
  std::vector<acc_t> row;     // (D,) one key or value row
  std::vector<acc_t> scores;  // (rows, chunk)
  std::vector<acc_t> acc;     // (rows, D)
  std::vector<acc_t> m, l;    // (rows,)
};

// Query row r of a kv head's group: q head `h0 + r / Tq`, token `r % Tq`.
struct Row {
  int64_t head, token;
};

template <typename scalar_t, typename acc_t>
void decode_task(const DecodeGeometry& g, const scalar_t* q, const scalar_t* k,
                 const scalar_t* v, int64_t b, int64_t hkv, KeyRange chunk, Scratch<acc_t>& s,
                 // outputs: either final (splits == 1) or partial
                 scalar_t* out, acc_t* lse, acc_t* part_o, acc_t* part_lse, int64_t split,
                 int64_t splits) {
  const int64_t d = g.head_dim, group = g.q_heads / g.kv_heads, rows = group * g.q_len;
  const int64_t width = std::max<int64_t>(chunk.hi - chunk.lo, 1);
  s.q.resize(rows * d);
  s.row.resize(d);
  s.scores.resize(rows * width);
  s.acc.assign(rows * d, acc_t(0));
  s.m.assign(rows, acc_t(-INFINITY));
  s.l.assign(rows, acc_t(0));
  std::vector<KeyRange> seen(rows);
  auto row_of = [&](int64_t r) { return Row{hkv * group + r / g.q_len, r % g.q_len}; };
  for (int64_t r = 0; r < rows; ++r) {
    const Row x = row_of(r);
    load_row(q + b * g.q_stride[0] + x.head * g.q_stride[1] + x.token * g.q_stride[2],
             &s.q[r * d], d);
    for (int64_t i = 0; i < d; ++i) s.q[r * d + i] *= static_cast<acc_t>(g.scale);
    seen[r] = intersect(chunk, visible_keys(x.token, g.q_len, g.k_len, g.causal, g.window_left,
                                            g.window_right));
  }
  const scalar_t* kb = k + b * g.k_stride[0] + hkv * g.k_stride[1];
  const scalar_t* vb = v + b * g.v_stride[0] + hkv * g.v_stride[1];
  // 1. scores
  for (int64_t j = chunk.lo; j < chunk.hi; ++j) {
    const acc_t* key = row_as_acc(kb + j * g.k_stride[2], s.row.data(), d);
    for (int64_t r = 0; r < rows; ++r) {
      const bool visible = j >= seen[r].lo && j < seen[r].hi;
      s.scores[r * width + (j - chunk.lo)] =
          visible ? dot(&s.q[r * d], key, d) : acc_t(-INFINITY);
    }
  }
  // 2. softmax statistics, scores become probabilities (unnormalized)
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* sr = &s.scores[r * width];
    if (seen[r].hi <= seen[r].lo) {  // sees no key of this chunk: weights 0, l = 0
      std::fill(sr, sr + width, acc_t(0));
      continue;
    }
    acc_t m = -INFINITY;
    for (int64_t j = seen[r].lo; j < seen[r].hi; ++j) m = std::max(m, sr[j - chunk.lo]);
    acc_t l = 0;
    for (int64_t j = 0; j < chunk.hi - chunk.lo; ++j) {
      sr[j] = sr[j] == acc_t(-INFINITY) ? acc_t(0) : exp_acc(sr[j] - m);
      l += sr[j];
    }
    s.m[r] = m;
    s.l[r] = l;
  }
  // 3. weighted values
  for (int64_t j = chunk.lo; j < chunk.hi; ++j) {
    const acc_t* value = row_as_acc(vb + j * g.v_stride[2], s.row.data(), d);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t p = s.scores[r * width + (j - chunk.lo)];
      if (p == acc_t(0)) continue;
      axpy(p, value, &s.acc[r * d], d);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Row x = row_of(r);
    const acc_t inv = s.l[r] > acc_t(0) ? acc_t(1) / s.l[r] : acc_t(0);
    const acc_t row_lse = chunk_lse(s.m[r], s.l[r]);
    const int64_t row_index = (b * g.q_heads + x.head) * g.q_len + x.token;
    if (splits == 1) {
      scalar_t* o = out + b * g.out_stride[0] + x.head * g.out_stride[1] + x.token * g.out_stride[2];
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(s.acc[r * d + i] * inv);
      lse[row_index] = row_lse;
    } else {
      acc_t* o = part_o + (row_index * splits + split) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = s.acc[r * d + i] * inv;
      part_lse[row_index * splits + split] = row_lse;
    }
  }
}

// Merges the splits' partial outputs of every query row into out / lse.
template <typename scalar_t, typename acc_t>
void merge_splits(const DecodeGeometry& g, const acc_t* part_o, const acc_t* part_lse,
                  int64_t splits, scalar_t* out, acc_t* lse) {
  const int64_t rows = g.batch * g.q_heads * g.q_len, d = g.head_dim;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % g.q_len, h = (row / g.q_len) % g.q_heads, b = row / (g.q_len * g.q_heads);
      acc_t max_lse = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) max_lse = std::max<acc_t>(max_lse, part_lse[row * splits + s]);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      acc_t total = 0;
      for (int64_t s = 0; s < splits; ++s) {
        const acc_t w = merge_weight<acc_t>(part_lse[row * splits + s], max_lse);
        if (w == acc_t(0)) continue;
        total += w;
        const acc_t* o = part_o + (row * splits + s) * d;
        for (int64_t i = 0; i < d; ++i) sum[i] += w * o[i];
      }
      const acc_t inv = total > acc_t(0) ? acc_t(1) / total : acc_t(0);
      scalar_t* o = out + b * g.out_stride[0] + h * g.out_stride[1] + t * g.out_stride[2];
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<scalar_t>(sum[i] * inv);
      lse[row] = total > acc_t(0) ? max_lse + log_acc(total) : acc_t(-INFINITY);
    }
  });
}

template <typename scalar_t, typename acc_t>
void decode_cpu(const DecodeGeometry& g, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, at::Tensor& out, at::Tensor& lse, int64_t splits) {
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* lp = lse.mutable_data_ptr<acc_t>();
  const int64_t rows = g.batch * g.q_heads * g.q_len;
  std::vector<acc_t> part_o(splits > 1 ? rows * splits * g.head_dim : 0);
  std::vector<acc_t> part_lse(splits > 1 ? rows * splits : 0);
  const int64_t tasks = g.batch * g.kv_heads * splits;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, hkv = (task / splits) % g.kv_heads;
      const int64_t b = task / (splits * g.kv_heads);
      decode_task<scalar_t, acc_t>(g, qp, kp, vp, b, hkv, split_keys(split, g.k_len, splits),
                                   scratch, op, lp, part_o.data(), part_lse.data(), split,
                                   splits);
    }
  });
  if (splits > 1) merge_splits<scalar_t, acc_t>(g, part_o.data(), part_lse.data(), splits, op, lp);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_decode_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, double scale,
                                                        bool causal, int64_t window_left,
                                                        int64_t window_right,
                                                        int64_t num_splits) {
  TURBOLM_OP("turbolm::attention_decode");
  DecodeGeometry g = check_decode(op, q, k, v, scale, causal, window_left, window_right, num_splits);
  CHECK_CPU(q);
  auto [out, lse] = new_decode_outputs(q, g);
  if (q.numel() == 0) return {out, lse};
  const int64_t splits = cpu_splits(g, num_splits);
  TURBOLM_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
    decode_cpu<scalar_t, acc_t>(g, q, k, v, out, lse, splits);
  });
  return {out, lse};
}

}  // namespace turbolm::attention

TORCH_LIBRARY_FRAGMENT(turbolm, m) {
  m.def(
      "attention_decode(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window_left,"
      " int window_right, int num_splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(turbolm, CPU, m) {
  m.impl("attention_decode", &turbolm::attention::attention_decode_cpu);
}
