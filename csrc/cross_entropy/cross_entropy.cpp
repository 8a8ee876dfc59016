// Fused linear + cross-entropy: the per-chunk loss-and-gradient step (CPU kernel).
//
// turbolm/ops/cross_entropy.py runs the LM head in chunks of rows: logits = x_chunk @ W^T, then
// this step turns each row of logits, in place, into the gradient of that row's loss, and
// returns the losses. The logits of the whole batch never exist at once.
//
// Per row z (V logits), target t, label smoothing e:
//   loss = logsumexp(z) - (1 - e) * z[t] - e * mean(z)        (torch.nn.functional.cross_entropy)
//   dz_j = softmax(z)_j - e / V - (1 - e) * [j == t]
// Rows whose target is ignore_index get loss 0 and a zero gradient. Statistics are accumulated
// in fp32 (fp64 for fp64 logits); 16-bit logits are read and written in their own dtype. exp
// is fast_exp for fp32 (a vectorizable polynomial, relative error < 1e-8; arguments below -87
// give ~1e-38 rather than 0), std::exp for fp64.
// at::parallel_for over rows (rows are independent: results do not depend on the thread count).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/dispatch.h"
#include "../common/fast_exp.h"
#include "../common/row_math.h"

namespace turbolm::cross_entropy {
namespace {

inline float exp_acc(float x) { return fast_exp(x); }  // vectorizable (common/fast_exp.h)
inline double exp_acc(double x) { return std::exp(x); }

// One row, in place: z[0..V) logits -> gradient of the row's loss; returns the loss.
// Sums and maxima run in kLanes independent lanes (common/row_math.h) so GCC vectorizes
// them without reassociating anything.
template <typename T, typename A>
A row_step(T* z, int64_t V, int64_t t, A smoothing) {
  A lane_max[kLanes], lane_sum[kLanes] = {};
  for (int j = 0; j < kLanes; ++j) lane_max[j] = -std::numeric_limits<A>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A v = static_cast<A>(z[i + j]);
      lane_max[j] = lane_max[j] < v ? v : lane_max[j];
      lane_sum[j] += v;
    }
  }
  for (int j = 0; i + j < V; ++j) {
    const A v = static_cast<A>(z[i + j]);
    lane_max[j] = lane_max[j] < v ? v : lane_max[j];
    lane_sum[j] += v;
  }
  A m = lane_max[0];
  for (int j = 1; j < kLanes; ++j) m = std::max(m, lane_max[j]);
  const A total = lanes_sum(lane_sum);
  A lane_exp[kLanes] = {};
  for (i = 0; i + kLanes <= V; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_exp[j] += exp_acc(static_cast<A>(z[i + j]) - m);
  for (int j = 0; i + j < V; ++j) lane_exp[j] += exp_acc(static_cast<A>(z[i + j]) - m);
  const A lse = m + std::log(lanes_sum(lane_exp));
  const A target = static_cast<A>(z[t]);
  const A loss = lse - (1 - smoothing) * target - smoothing * total / static_cast<A>(V);
  const A uniform = smoothing / static_cast<A>(V);
  for (i = 0; i < V; ++i) z[i] = static_cast<T>(exp_acc(static_cast<A>(z[i]) - lse) - uniform);
  z[t] = static_cast<T>(std::exp(target - lse) - uniform - (1 - smoothing));
  return loss;
}

at::Tensor cross_entropy_step_cpu(at::Tensor& logits, const at::Tensor& targets,
                                  double label_smoothing, int64_t ignore_index) {
  TURBOLM_OP("turbolm::cross_entropy_step_");
  CHECK_FLOAT(logits);
  CHECK_CPU(logits);
  CHECK_DIM(logits, 2);
  CHECK_CONTIGUOUS(logits);
  CHECK_DTYPE(targets, c10::ScalarType::Long);
  CHECK_CPU(targets);
  CHECK_SHAPE(targets, logits.size(0));
  TURBOLM_CHECK(InputError, label_smoothing >= 0 && label_smoothing <= 1,
                "label_smoothing must be in [0, 1], got ", label_smoothing);
  const at::Tensor t = targets.contiguous();
  const int64_t rows = logits.size(0), V = logits.size(1);
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TURBOLM_CHECK(InputError, tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < V), "targets[", i,
                  "] = ", tp[i], " is out of range for ", V, " classes (ignore_index is ",
                  ignore_index, ")");
  }
  const bool fp64 = logits.scalar_type() == c10::ScalarType::Double;
  at::Tensor losses = at::empty({rows}, logits.options().dtype(fp64 ? at::kDouble : at::kFloat));
  TURBOLM_DISPATCH_FLOAT(logits.scalar_type(), op, [&] {
    scalar_t* z = logits.mutable_data_ptr<scalar_t>();
    acc_t* out = losses.mutable_data_ptr<acc_t>();
    const acc_t smoothing = static_cast<acc_t>(label_smoothing);
    // about 16K logits per task, so small chunks stay on one thread
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = z + i * V;
        if (tp[i] == ignore_index) {
          std::fill(row, row + V, static_cast<scalar_t>(0));
          out[i] = 0;
        } else {
          out[i] = row_step<scalar_t, acc_t>(row, V, tp[i], smoothing);
        }
      }
    });
  });
  return losses;
}

}  // namespace
}  // namespace turbolm::cross_entropy

TORCH_LIBRARY_FRAGMENT(turbolm, m) {
  m.def(
      "cross_entropy_step_(Tensor(a!) logits, Tensor targets, float label_smoothing, "
      "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbolm, CPU, m) {
  m.impl("cross_entropy_step_", &turbolm::cross_entropy::cross_entropy_step_cpu);
}
