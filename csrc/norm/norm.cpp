// LayerNorm / RMSNorm: op schemas (torch.ops.turbolm.*) and the CPU kernels.
//
// CPU design: OpenMP over rows; each row is read in place (contiguous (rows, N) input) with
// the two-pass lane statistics of common/row_math.h, accumulating in fp32 (fp64 for fp64
// data). 16-bit rows are converted to per-thread fp32 buffers in bulk first (8-wide F16C
// conversions when the build targets AVX2/F16C), computed in fp32, and converted back. Backward computes dx row by row and the weight / bias gradients as partial sums per
// chunk of rows, then adds the chunk partials in a fixed order. The chunking depends only on
// (rows, N), never on the thread count, so dweight / dbias are bitwise reproducible.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef __F16C__
#include <immintrin.h>
#endif

#include "../common/dispatch.h"
#include "../common/row_math.h"
#include "norm.h"

namespace turbolm::norm {
namespace {

// A type carried as a value, to pick a template instance inside a generic lambda
// (std::type_identity is C++20; torch < 2.14 builds extensions as C++17).
template <typename T>
struct TypeTag {
  using type = T;
};

// Threads for a job of `work` elements split in `tasks` pieces: about one per 64K elements,
// at most torch's intra-op thread count (torch.set_num_threads).
int threads_for(int64_t work, int64_t tasks) {
  const int64_t want = std::max<int64_t>(1, work / 65536);
  const int64_t t = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), want, tasks});
  return static_cast<int>(std::max<int64_t>(1, t));
}

// ---- 16-bit rows: converted to fp32 in bulk, computed in fp32, converted back -------------
// (F16C's 8-wide conversions when the build targets them: scalar c10::Half conversions do not
// vectorize and would dominate the run time.)

template <typename T>
void to_acc(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  if constexpr (std::is_same_v<T, c10::Half>) {
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
void from_acc(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  if constexpr (std::is_same_v<T, c10::Half>) {
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// fp32 copy of an optional (N,) parameter (empty when absent).
template <typename T>
std::vector<float> acc_copy(const T* p, int64_t n) {
  std::vector<float> out(p ? n : 0);
  if (p) to_acc(p, out.data(), n);
  return out;
}

template <typename T, typename acc_t>
constexpr bool kConvertRows = !std::is_same_v<T, acc_t>;

// Rows of storage type T; W / B are the parameters as acc_t (fp32 copies for 16-bit types).
template <bool HAS_W, bool HAS_B, typename T, typename acc_t, typename P>
void norm_fwd_rows(const T* x, const P* w, const P* b, T* y, acc_t* mean, acc_t* rstd,
                   int64_t rows, int64_t n, acc_t eps, bool rms) {
  const int nt = threads_for(rows * n, rows);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // Per-thread fp32 row buffers for 16-bit types.
    std::vector<acc_t> xbuf(kConvertRows<T, acc_t> ? n : 0), ybuf(kConvertRows<T, acc_t> ? n : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      acc_t mu = 0, rs = 0;
      if constexpr (kConvertRows<T, acc_t>) {
        to_acc(x + r * n, xbuf.data(), n);
        if (rms) {
          rms_norm_row_stats(xbuf.data(), n, eps, &rs);
        } else {
          layer_norm_row_stats(xbuf.data(), n, eps, &mu, &rs);
        }
        norm_row_apply<HAS_W, HAS_B>(xbuf.data(), w, b, ybuf.data(), n, mu, rs);
        from_acc(ybuf.data(), y + r * n, n);
      } else {
        const T* xr = x + r * n;
        if (rms) {
          rms_norm_row_stats(xr, n, eps, &rs);
        } else {
          layer_norm_row_stats(xr, n, eps, &mu, &rs);
        }
        norm_row_apply<HAS_W, HAS_B>(xr, w, b, y + r * n, n, mu, rs);
      }
      if (mean) mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

template <typename T, typename acc_t>
void norm_fwd_cpu(const T* x, const T* w_in, const T* b_in, T* y, acc_t* mean, acc_t* rstd,
                  int64_t rows, int64_t n, acc_t eps, bool rms) {
  // Parameters as acc_t: converted once per call for 16-bit types.
  std::vector<acc_t> wc, bc;
  const acc_t* w = nullptr;
  const acc_t* b = nullptr;
  if constexpr (kConvertRows<T, acc_t>) {
    wc = acc_copy(w_in, n);
    bc = acc_copy(b_in, n);
    w = w_in ? wc.data() : nullptr;
    b = b_in ? bc.data() : nullptr;
  } else {
    w = w_in;
    b = b_in;
  }
  if (w && b) {
    norm_fwd_rows<true, true>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  } else if (w) {
    norm_fwd_rows<true, false>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  } else if (b) {
    norm_fwd_rows<false, true>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  } else {
    norm_fwd_rows<false, false>(x, w, b, y, mean, rstd, rows, n, eps, rms);
  }
}

// Partial-sum buffers hold at most this many values each (8 MiB in fp32); each chunk has at
// least kMinChunkRows rows, so summing the partials stays cheap next to the rows' work.
constexpr int64_t kPartialBudget = int64_t(1) << 21;
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kMinChunkRows = 16;

template <typename T, typename acc_t>
void norm_bwd_cpu(const T* dy, const T* x, const T* w_in, const acc_t* mean, const acc_t* rstd,
                  T* dx, T* dw, T* db, int64_t rows, int64_t n, bool rms) {
  const bool partials = dw != nullptr || db != nullptr;
  // Row chunks: a function of (rows, n) only, so the dw / db sums are deterministic.
  const int64_t max_chunks =
      partials ? std::max<int64_t>(1, std::min({kMaxChunks, kPartialBudget / n,
                                                (rows + kMinChunkRows - 1) / kMinChunkRows}))
               : rows;
  const int64_t chunks = std::max<int64_t>(1, std::min(rows, max_chunks));
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  std::vector<acc_t> pw(dw ? chunks * n : 0, acc_t(0));
  std::vector<acc_t> pb(db ? chunks * n : 0, acc_t(0));
  std::vector<acc_t> wc;
  const acc_t* w = nullptr;
  if constexpr (kConvertRows<T, acc_t>) {
    wc = acc_copy(w_in, n);
    w = w_in ? wc.data() : nullptr;
  } else {
    w = w_in;
  }
  // The row routine specialized for weight presence and which partial sums are needed; it
  // works on acc_t rows (fp32 buffers for 16-bit types).
  using RowFn = void (*)(const acc_t*, const acc_t*, const acc_t*, acc_t*, int64_t, acc_t, acc_t,
                         bool, acc_t*, acc_t*);
  using RowFnT = void (*)(const T*, const T*, const acc_t*, T*, int64_t, acc_t, acc_t, bool,
                          acc_t*, acc_t*);
  auto pick = [&](auto tag) {
    using E = typename decltype(tag)::type;
    using Fn = void (*)(const E*, const E*, const acc_t*, E*, int64_t, acc_t, acc_t, bool, acc_t*,
                        acc_t*);
    return w ? (dw ? (db ? Fn(&norm_row_backward<true, true, true, E, acc_t, acc_t>)
                         : Fn(&norm_row_backward<true, true, false, E, acc_t, acc_t>))
                   : (db ? Fn(&norm_row_backward<true, false, true, E, acc_t, acc_t>)
                         : Fn(&norm_row_backward<true, false, false, E, acc_t, acc_t>)))
             : (dw ? (db ? Fn(&norm_row_backward<false, true, true, E, acc_t, acc_t>)
                         : Fn(&norm_row_backward<false, true, false, E, acc_t, acc_t>))
                   : (db ? Fn(&norm_row_backward<false, false, true, E, acc_t, acc_t>)
                         : Fn(&norm_row_backward<false, false, false, E, acc_t, acc_t>)));
  };
  const RowFn row_acc = pick(TypeTag<acc_t>{});
  const RowFnT row_direct = pick(TypeTag<T>{});
  const int nt = threads_for(rows * n, chunks);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int64_t bn = kConvertRows<T, acc_t> ? n : 0;
    std::vector<acc_t> dybuf(bn), xbuf(bn), dxbuf(bn);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      acc_t* cw = dw ? pw.data() + c * n : nullptr;
      acc_t* cb = db ? pb.data() + c * n : nullptr;
      const int64_t end = std::min(rows, (c + 1) * per_chunk);
      for (int64_t r = c * per_chunk; r < end; ++r) {
        const acc_t mu = mean ? mean[r] : acc_t(0);
        if constexpr (kConvertRows<T, acc_t>) {
          to_acc(dy + r * n, dybuf.data(), n);
          to_acc(x + r * n, xbuf.data(), n);
          row_acc(dybuf.data(), xbuf.data(), w, dxbuf.data(), n, mu, rstd[r], rms, cw, cb);
          from_acc(dxbuf.data(), dx + r * n, n);
        } else {
          row_direct(dy + r * n, x + r * n, w, dx + r * n, n, mu, rstd[r], rms, cw, cb);
        }
      }
    }
  }
  if (!partials) return;
  // Fixed-order sum of the chunk partials, parallel over columns.
  const int ct = threads_for(chunks * n, n);
#pragma omp parallel for num_threads(ct) schedule(static) if (ct > 1)
  for (int64_t j = 0; j < n; ++j) {
    acc_t sw = 0, sb = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      if (dw) sw += pw[c * n + j];
      if (db) sb += pb[c * n + j];
    }
    if (dw) dw[j] = static_cast<T>(sw);
    if (db) db[j] = static_cast<T>(sb);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps) {
  TURBOLM_OP("turbolm::layer_norm_fwd");
  check_fwd(op, x_in, weight, bias, eps);
  check_on_cpu(op, x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor mean = new_output({rows}, x.options().dtype(stat_dtype(x)));
  at::Tensor rstd = new_output({rows}, x.options().dtype(stat_dtype(x)));
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    norm_fwd_cpu<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
                                  ptr_or_null<scalar_t>(b), y.mutable_data_ptr<scalar_t>(),
                                  mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
                                  rows, n, static_cast<acc_t>(eps), /*rms=*/false);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_in,
                                                    const std::optional<at::Tensor>& weight,
                                                    double eps) {
  TURBOLM_OP("turbolm::rms_norm_fwd");
  check_fwd(op, x_in, weight, std::nullopt, eps);
  check_on_cpu(op, x_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = new_output(x.sizes(), x.options());
  at::Tensor rstd = new_output({rows}, x.options().dtype(stat_dtype(x)));
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    norm_fwd_cpu<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
                                  nullptr, y.mutable_data_ptr<scalar_t>(), nullptr,
                                  rstd.mutable_data_ptr<acc_t>(), rows, n,
                                  static_cast<acc_t>(eps), /*rms=*/true);
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, bool has_bias) {
  TURBOLM_OP("turbolm::layer_norm_bwd");
  check_bwd(op, dy_in, x_in, weight, &mean_in, rstd_in);
  check_on_cpu(op, x_in);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor dw = new_output({weight ? n : 0}, x.options());
  at::Tensor db = new_output({has_bias ? n : 0}, x.options());
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    norm_bwd_cpu<scalar_t, acc_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
        dx.mutable_data_ptr<scalar_t>(), weight ? dw.mutable_data_ptr<scalar_t>() : nullptr,
        has_bias ? db.mutable_data_ptr<scalar_t>() : nullptr, rows, n, /*rms=*/false);
  });
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_in,
                                                    const at::Tensor& x_in,
                                                    const std::optional<at::Tensor>& weight,
                                                    const at::Tensor& rstd_in) {
  TURBOLM_OP("turbolm::rms_norm_bwd");
  check_bwd(op, dy_in, x_in, weight, nullptr, rstd_in);
  check_on_cpu(op, x_in);
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = new_output(x.sizes(), x.options());
  at::Tensor dw = new_output({weight ? n : 0}, x.options());
  TURBOLM_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    norm_bwd_cpu<scalar_t, acc_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(w),
        nullptr, rstd.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
        weight ? dw.mutable_data_ptr<scalar_t>() : nullptr, nullptr, rows, n, /*rms=*/true);
  });
  return {dx, dw};
}

}  // namespace
}  // namespace turbolm::norm

TORCH_LIBRARY_FRAGMENT(turbolm, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(turbolm, CPU, m) {
  m.impl("layer_norm_fwd", &turbolm::norm::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &turbolm::norm::layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &turbolm::norm::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &turbolm::norm::rms_norm_bwd_cpu);
}
